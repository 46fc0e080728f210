"""What users read: four-point grading and its storage, defect tables, the HTML roll report.

May import `storage` only (see docs/architecture.md).
"""
