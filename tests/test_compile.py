"""torch.compile and CUDA graphs over a DCNv2 ResNet backbone: the operators are one graph node each
(C++ kernels, Python fake kernels), so ``fullgraph=True`` compiles the whole backbone and its result
equals eager's; a CUDA graph capture replays it unchanged.

The backbone is the R18 variant of the mdconv quick config (narrow, two deformable groups) with its
offset predictors randomised (zero-initialised they would sample the regular grid, and a broken
offset path would go unseen).
"""

import pytest
import torch

from builders import NARROW, SMALL, make_model

pytestmark = pytest.mark.usefixtures("op_test_env")  # seed, one thread (conftest.py)

OPTS = [
    *SMALL, *NARROW, "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "32",
    "MODEL.RESNETS.DEFORM_NUM_GROUPS", "2",
]  # fmt: skip


def _backbone(device="cpu"):
    _, model = make_model("mask_rcnn_R50_FPN_dcnv2", *OPTS, "MODEL.DEVICE", device)
    bottom_up = model.backbone.bottom_up.eval()
    deform = [n for n, p in bottom_up.named_parameters() if "offset" in n]
    assert deform, "the config built no deformable layer"
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in bottom_up.named_parameters():
            if "offset" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.05)
    return bottom_up


def test_compile_fullgraph_equals_eager():
    torch._dynamo.reset()
    model = _backbone()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        got = compiled(x)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-5, msg=name)


def test_compile_fullgraph_training_step_gradients_equal_eager():
    """Forward and backward through the C++ autograd kernel under AOTAutograd."""
    torch._dynamo.reset()
    model = _backbone().train()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    params = [p for p in model.parameters() if p.requires_grad]  # the stem is frozen
    out = sum(v.square().mean() for v in model(x).values())
    expected = torch.autograd.grad(out, params)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out_c = sum(v.square().mean() for v in compiled(x).values())
    got = torch.autograd.grad(out_c, params)
    torch.testing.assert_close(out_c, out, rtol=1e-5, atol=1e-6)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (CUDA graph capture)"
)
def test_cuda_graph_replay_equals_eager():
    from projects_dcnv2.layers import WITH_CUDA

    if not WITH_CUDA:
        pytest.skip("projects_dcnv2 was built without CUDA kernels")
    model = _backbone("cuda")
    static_x = torch.randn(2, 3, 64, 64, device="cuda")
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the capture (cuBLAS workspaces, allocations)
                model(static_x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = model(static_x)
        x = torch.randn(2, 3, 64, 64, device="cuda")
        static_x.copy_(x)
        graph.replay()
        expected = model(x)
    for name in expected:
        torch.testing.assert_close(static_out[name], expected[name], rtol=1e-5, atol=1e-5)
