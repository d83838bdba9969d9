"""Fault numerics, torch only (no Ray, no pyarrow): bit flips, fault sites, trial records, the
batched engine and the pytorchfi reference oracle. Everything here runs in a notebook."""
