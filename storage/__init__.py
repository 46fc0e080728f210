"""Everything that persists: settings, PostgreSQL schema, object store, zarr roll layout, model registry.

Not built yet: see the storage issue. Only `distill`'s checkpoint format may be imported from here.
"""
