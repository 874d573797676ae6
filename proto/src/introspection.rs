//! gRPC reflection for every Switchyard server, so `grpcurl` works with no proto files.
//! Both reflection versions are served: older grpcurl releases only speak `v1alpha`.

use tonic_reflection::server::{v1, v1alpha};

/// Reflection services describing the Switchyard protos and `grpc.health.v1`.
pub fn reflection_services() -> (
    v1::ServerReflectionServer<impl v1::ServerReflection>,
    v1alpha::ServerReflectionServer<impl v1alpha::ServerReflection>,
) {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
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
        let _ = super::reflection_services();
    }
}
