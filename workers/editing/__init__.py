"""The editing maths: statistics and projectors, target values, the constrained update.

Plain torch + transformers: no Ray, gRPC or DeepSpeed here, so the same code runs in one
process, inside a worker and in tests. Modules import torch; this package file does not.
"""

# Part of every checkpoint ID: bump when a change alters what the same edit computes.
ENGINE_VERSION = "1"
