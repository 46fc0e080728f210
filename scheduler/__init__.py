"""The control plane and the `rollscan` command line."""
