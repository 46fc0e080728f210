"""Datasets: MVTec AD layout, AITEX import, synthetic fabric."""
