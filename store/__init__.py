"""The HDF5 warehouse: schema, crash-safe writer, read-only reader (numpy + h5py only)."""

from store.schema import (
    A,
    F,
    INVARIANTS,
    M,
    Field,
    Mode,
    Role,
    SCHEMA_VERSION,
)
from store.warehouse import (
    ShardWriter,
    WarehouseError,
    WarehouseReader,
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
