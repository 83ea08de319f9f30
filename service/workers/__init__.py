"""One process per partition: owns the onnxruntime sessions of the models placed there."""
