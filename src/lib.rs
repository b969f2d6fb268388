//! Keel's wire contract: the Rust code generated from `proto/`, plus the encoded
//! descriptor set that every server registers for gRPC reflection.

/// `keel.auth.v1`
pub mod auth {
    pub mod v1 {
        tonic::include_proto!("keel.auth.v1");
    }
}

/// `keel.jobs.v1`
pub mod jobs {
    // The batched results' oneofs hold a whole job beside a small error:
    // boxing it would only add an allocation per item.
    #[allow(clippy::large_enum_variant)]
    pub mod v1 {
        tonic::include_proto!("keel.jobs.v1");
    }
}

/// `keel.memory.v1`
pub mod memory {
    pub mod v1 {
        tonic::include_proto!("keel.memory.v1");
    }
}

/// `keel.admin.v1`: the operators' API (see `proto/keel/admin/v1/admin.proto`).
pub mod admin {
    pub mod v1 {
        tonic::include_proto!("keel.admin.v1");
    }
}

/// Encoded `FileDescriptorSet` of every Keel proto and its imports, for
/// `tonic_reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("keel_descriptor");

pub use prost_types;
