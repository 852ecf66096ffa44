"""runtime/: rank discovery from torchrun and SLURM, and each CPU adaptation of megatron-core."""
import torch

from megatron_tempnet import runtime


def test_torchrun_environment():
    env = runtime.discover_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert env == runtime.DistEnv(3, 4, 1, "n1", 1234)


def test_slurm_environment_without_hand_set_variables():
    env = runtime.discover_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                                 "SLURM_NODELIST": "gpu[07-08,12]", "SLURM_JOB_ID": "4242"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr) == (5, 8, 1, "gpu07")
    same_job = runtime.discover_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_NODELIST": "gpu07",
                                      "SLURM_JOB_ID": "4242"})
    assert same_job.master_port == env.master_port and 20000 <= env.master_port < 40000


def test_single_process_default():
    env = runtime.discover_env({})
    assert (env.rank, env.world_size) == (0, 1)
    assert env.master_port > 0  # a free port of its own, so that single-process runs can share a machine
    assert runtime.discover_env({"MASTER_PORT": "4321"}).master_port == 4321


def test_slurm_nodelist_forms():
    assert runtime.launch._first_slurm_host("a01,a02") == "a01"
    assert runtime.launch._first_slurm_host("node[3-5]") == "node3"
    assert runtime.launch._first_slurm_host("solo") == "solo"


def test_cpu_adaptation_maps_cuda_requests_to_cpu(single_rank):
    if torch.cuda.is_available():
        return  # nothing is adapted on a GPU machine
    assert torch.cuda.current_device() == torch.device("cpu")
    torch.cuda.synchronize()
    torch.cuda.current_stream().wait_stream(None)
    t = torch.zeros(3, device="cuda")
    assert t.device.type == "cpu"
    assert torch.tensor([1.0], device="cuda").device.type == "cpu"
    assert t.cuda() is t
    assert t.type() == "torch.cuda.FloatTensor"  # what megatron-core's optimizer checks for
    assert t.to("cuda").device.type == "cpu"


def test_cpu_rng_tracker_forks_without_cuda(single_rank):
    from megatron.core import tensor_parallel

    with tensor_parallel.get_cuda_rng_tracker().fork():
        torch.rand(2)


def test_cpu_adaptation_keeps_cuda_stream_a_type(single_rank):
    """Libraries annotate with torch.cuda.Stream | None at import time (transformers does)."""
    assert (torch.cuda.Stream | None) is not None
    import transformers.generation  # noqa: F401  imports after the adaptation


def test_cpu_backward_pass_runs_without_the_device_mode(single_rank):
    """megatron-core's backward (and the Python hooks it runs) skips the CPU device mode's per-call cost."""
    if torch.cuda.is_available():
        return
    from megatron.core.pipeline_parallel import schedules

    seen = []
    x = torch.ones(2, requires_grad=True)
    y = (x * 2).sum()
    y.register_hook(lambda g: seen.append(torch._C._is_torch_function_mode_enabled()))
    assert torch._C._is_torch_function_mode_enabled()
    schedules.custom_backward(y, None)
    assert seen == [False] and x.grad.tolist() == [2.0, 2.0]


def test_cpu_grad_clipping_kernels_give_megatron_core_fallback_values(single_rank):
    if torch.cuda.is_available():
        return
    from megatron.core.optimizer import clip_grads
    from megatron.core.utils import local_multi_tensor_l2_norm, local_multi_tensor_scale

    from megatron_tempnet import runtime

    assert clip_grads.l2_norm_impl is runtime.foreach_l2_norm
    grads = [torch.randn(7, 3), torch.randn(5), torch.randn(2, 2, 2)]
    theirs, _ = local_multi_tensor_l2_norm(0, None, [grads], False)
    ours, _ = runtime.foreach_l2_norm(0, None, [grads], False)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    expected = [g.clone() for g in grads]
    local_multi_tensor_scale(0, None, [expected, expected], 0.3)
    runtime.foreach_scale(0, None, [grads, grads], 0.3)  # in place, as clip_grad_by_total_norm_fp32 calls it
    copies = [torch.empty_like(g) for g in grads]
    runtime.foreach_scale(0, None, [grads, copies], 2.0)
    for g, e, c in zip(grads, expected, copies):
        assert torch.equal(g, e) and torch.equal(c, g * 2.0)
