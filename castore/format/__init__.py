"""The on-bucket format (docs/FORMAT.md): chunking, chunk codecs, manifests, keys, trees.

This package knows nothing of S3, of backends or of torch.
"""

from castore.format.chunking import ChunkerParams, cut, params_for_size
from castore.format.codec import decode_chunk, encode_chunk
from castore.format.keys import chunk_path, manifest_path, manifest_prefix, validate_key, validate_namespace
from castore.format.manifest import FORMAT_VERSION, ChunkRef, Manifest

__all__ = [
    "FORMAT_VERSION",
    "ChunkRef",
    "ChunkerParams",
    "Manifest",
    "chunk_path",
    "cut",
    "decode_chunk",
    "encode_chunk",
    "manifest_path",
    "manifest_prefix",
    "params_for_size",
    "validate_key",
    "validate_namespace",
]
