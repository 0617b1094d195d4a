"""Loaders, one per weight format. Each turns a pretrained file into a `torch.nn.Module` that reproduces the
original runtime exactly: it takes an NCHW float32 batch holding the SAME values the original runtime is fed (after
NHWC->NCHW where the runtime is NHWC) and returns the original output, shape [B, D], unnormalised, with autograd.
Pre-processing to/from [0, 1] RGB and crop geometry live in the registry (`faceveil.models.zoo`), not here.

    tfjs.load_graph_model(json_path, output_node) -> nn.Module
    onnx_graph.load_onnx(onnx_path) -> nn.Module
    tflite_graph.load_tflite(tflite_path) -> nn.Module
    dlib_dat.load_dlib_resnet(dat_path) -> nn.Module
"""
