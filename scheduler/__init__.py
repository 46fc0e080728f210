"""The control plane: upload discovery and its loop, submit, resume, reprocessing and the nightly
grading beat; it enqueues work, the workers do it."""
