//! What the layers know about each method, read from the protobuf descriptors: whether it is
//! safe to retry (`idempotency_level`) and whether its response streams.

use std::{collections::HashMap, sync::Arc};

/// A map keyed by method path (or service name), as the layers look things up on every
/// call: a fast fixed-seed hash rather than SipHash. Such maps are built from configuration
/// and descriptors, or bounded when requests add to them, so a flooding of crafted keys
/// cannot degrade them.
pub type PathMap<V> = HashMap<String, V, foldhash::fast::FixedState>;

use prost::Message;
use prost_types::{FileDescriptorSet, method_options::IdempotencyLevel};

/// A method's retry-relevant facts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MethodInfo {
    /// Marked `NO_SIDE_EFFECTS` or `IDEMPOTENT` in the proto.
    pub idempotent: bool,
    /// The request is a stream.
    pub client_streaming: bool,
    /// The response is a stream.
    pub server_streaming: bool,
}

impl MethodInfo {
    /// One request message and one response message.
    pub fn is_unary(&self) -> bool {
        !self.client_streaming && !self.server_streaming
    }
}

/// Facts about methods, by HTTP/2 path (`/package.Service/Method`). Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct MethodTable {
    methods: Arc<PathMap<MethodInfo>>,
}

impl MethodTable {
    /// Reads every method of every service in encoded `FileDescriptorSet`s (as produced by
    /// `tonic-prost-build`'s `file_descriptor_set_path`).
    pub fn from_descriptor_sets(sets: &[&[u8]]) -> Result<Self, prost::DecodeError> {
        let mut methods = PathMap::default();
        for bytes in sets {
            let set = FileDescriptorSet::decode(*bytes)?;
            for file in set.file {
                let package = file.package();
                for service in &file.service {
                    for method in &service.method {
                        let level = method
                            .options
                            .as_ref()
                            .map(|o| o.idempotency_level())
                            .unwrap_or(IdempotencyLevel::IdempotencyUnknown);
                        let path = if package.is_empty() {
                            format!("/{}/{}", service.name(), method.name())
                        } else {
                            format!("/{package}.{}/{}", service.name(), method.name())
                        };
                        methods.insert(
                            path,
                            MethodInfo {
                                idempotent: level != IdempotencyLevel::IdempotencyUnknown,
                                client_streaming: method.client_streaming(),
                                server_streaming: method.server_streaming(),
                            },
                        );
                    }
                }
            }
        }
        Ok(Self {
            methods: Arc::new(methods),
        })
    }

    /// Every method: its path and facts.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &MethodInfo)> {
        self.methods
            .iter()
            .map(|(path, info)| (path.as_str(), info))
    }

    /// The facts for a path; an unknown method is treated as non-idempotent and streaming,
    /// the assumptions under which no layer does anything unsafe.
    pub fn get(&self, path: &str) -> MethodInfo {
        self.methods.get(path).copied().unwrap_or(MethodInfo {
            idempotent: false,
            client_streaming: true,
            server_streaming: true,
        })
    }
}

/// Splits `/package.Service/Method` into service and method.
pub fn split_path(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix('/')?;
    let (service, method) = rest.split_once('/')?;
    (!service.is_empty() && !method.is_empty() && !method.contains('/'))
        .then_some((service, method))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_paths() {
        assert_eq!(split_path("/a.B/C"), Some(("a.B", "C")));
        assert_eq!(split_path("a.B/C"), None);
        assert_eq!(split_path("/a.B/"), None);
        assert_eq!(split_path("/a.B/C/D"), None);
    }
}
