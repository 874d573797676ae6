# Sourced by the other scripts. etcd-client's build script runs `protoc`; when no protoc is
# installed, build protox's protoc-compatible CLI (pure Rust, from crates.io) into target/tools
# and point PROTOC at it, so no root and no system package is needed.
ensure_protoc() {
  if [ -n "${PROTOC:-}" ] || command -v protoc >/dev/null 2>&1; then
    return 0
  fi
  local root
  root="$(pwd)/target/tools"
  if [ ! -x "$root/bin/protox" ]; then
    echo "no protoc found: building protox's CLI into $root" >&2
    cargo install --quiet --locked protox --version 0.10.0 --features bin --root "$root"
  fi
  export PROTOC="$root/bin/protox"
}
