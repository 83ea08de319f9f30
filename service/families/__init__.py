"""Pre- and post-processing per model family: files people have <-> the tensors in the contracts."""
