//! gRPC reflection for every Switchyard server, so `grpcurl` works with no proto files.
//! Both reflection versions are served (older grpcurl releases only speak `v1alpha`), and each
//! describes itself and the other, so either can be asked about both.

use tonic_reflection::server::{v1, v1alpha};

/// The services every server adds to what it names: health and both reflection versions.
const ALWAYS_SERVED: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// Reflection services listing `served` (fully qualified names, e.g.
/// `<InferenceServer<_> as NamedService>::NAME`) besides health and reflection: a server lists
/// what it answers, not every service the protos define.
pub fn reflection_services(
    served: &[&str],
) -> (
    v1::ServerReflectionServer<impl v1::ServerReflection>,
    v1alpha::ServerReflectionServer<impl v1alpha::ServerReflection>,
) {
    let builder = || {
        let builder = tonic_reflection::server::Builder::configure()
            .include_reflection_service(false)
            .register_encoded_file_descriptor_set(crate::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            );
        served
            .iter()
            .chain(&ALWAYS_SERVED)
            .fold(builder, |builder, name| builder.with_service_name(*name))
    };
    // The descriptor sets are compiled in and checked by the test below, so building cannot fail.
    let v1 = builder()
        .build_v1()
        .expect("embedded descriptor sets are valid");
    let v1alpha = builder()
        .build_v1alpha()
        .expect("embedded descriptor sets are valid");
    (v1, v1alpha)
}

#[cfg(test)]
mod tests {
    #[test]
    fn embedded_descriptor_sets_build() {
        let _ = super::reflection_services(&["switchyard.v1.Inference"]);
    }
}
