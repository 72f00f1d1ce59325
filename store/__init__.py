"""The HDF5 warehouse: schema, crash-safe writer, read-only reader (numpy + h5py only)."""

from store.errors import WarehouseError
from store.reader import WarehouseReader
from store.schema import (
    INVARIANTS,
    SCHEMA_VERSION,
    A,
    F,
    Field,
    M,
    Mode,
    Role,
)
from store.shard import ShardWriter
from store.warehouse import (
    WarehouseWriter,
    validation_array,
    write_json_atomic,
)

__all__ = [
    "A",
    "F",
    "INVARIANTS",
    "M",
    "SCHEMA_VERSION",
    "Field",
    "Mode",
    "Role",
    "ShardWriter",
    "WarehouseError",
    "WarehouseReader",
    "WarehouseWriter",
    "validation_array",
    "write_json_atomic",
]
