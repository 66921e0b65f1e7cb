"""Serving the exported model with ONNX Runtime alone: the predictor and the ONNX helpers it shares with the
quantize and export stages. Nothing here imports torch at module level (tests/test_predict.py runs predict
where torch cannot be imported)."""
