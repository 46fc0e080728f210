"""Everything that persists: settings, PostgreSQL schema, object store, zarr roll layout, model registry.

Only `distill`'s checkpoint format may be imported from here (docs/architecture.md).
"""
