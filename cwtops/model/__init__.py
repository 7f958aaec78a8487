"""The hybrid CWT-CNN network, data-parallel training and the served ONNX signature."""
