"""The benchmark tools: step_time.py's variants and profile parser, the GPU check driver, the
deviceless report."""

import json
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import authors_iteration  # noqa: E402
import gpu_check  # noqa: E402
import startup  # noqa: E402
import step_time  # noqa: E402

# ----------------------------------------------------------------------------- startup


def test_startup_breakdown_splits_a_start_by_function_and_phase():
    def event(t, name, s, fun=""):
        return {"t": t, "event": name, "s": s, "fun": fun}

    events = [
        event(4.0, startup.TRACE, 0.01, "stage"),  # the first trace starts at 3.99 s
        event(7.0, startup.TRACE, 3.0, "init"),
        event(8.0, startup.LOWER, 1.0, "jit(init)"),
        event(12.0, startup.COMPILE, 4.0, "jit(init)"),  # no cache read: compiled
        event(20.0, startup.TRACE, 8.0, "train_with_lr"),
        event(22.0, startup.LOWER, 2.0, "jit(train_with_lr)"),
        event(40.0, startup.CACHE_READ, 17.9),
        event(40.01, startup.COMPILE, 18.0, "jit(train_with_lr)"),  # loaded
        event(50.0, startup.TRACE, 1.0, "eval_fn"),  # after the first step: left out
    ]
    parts = startup.breakdown(events, total=43.0)
    assert parts["before_first_trace_s"] == pytest.approx(3.99)
    assert parts["functions"] == {
        "init": {"trace_s": 3.0, "lower_s": 1.0, "compile_s": 4.0},
        "train_with_lr": {"trace_s": 8.0, "lower_s": 2.0, "cache_load_s": 18.0}}
    # 'stage' (0.01 s) is under the 0.1 s threshold: part of the rest with the first step
    assert parts["rest_s"] == pytest.approx(43.0 - 3.99 - 8.0 - 28.0)


# ----------------------------------------------------------------------------- step_time


def test_variants_default_to_the_flags_and_pair_torch_with_bank_only():
    args = step_time.parse_args(["--batch-size", "16", "--compare-torch", "--torch-amp"])
    (v,) = step_time.parse_variants(args)
    assert (v.batch_size, v.dtype, v.memory, v.kernels, v.xla, v.torch) == (
        16, "float32", "bank", "auto", "default", "amp")
    args = step_time.parse_args([
        "--compare-torch", "--variants",
        "batch=64,dtype=bfloat16;batch=64,memory=queue;xla=none,kernels=standard,torch=off"])
    a, b, c = step_time.parse_variants(args)
    assert (a.batch_size, a.dtype, a.torch) == (64, "bfloat16", "float32")
    assert (b.memory, b.torch) == ("queue", "off")  # torch implements only the bank
    assert (c.batch_size, c.xla, c.kernels, c.torch) == (8, "none", "standard", "off")
    assert len({a.label, b.label, c.label}) == 3


@pytest.mark.parametrize("spec, message", [
    ("batch=8;batch=8", "repeats"),
    ("size=3", "bad variant item"),
    ("dtype=float16", "expected one of"),
    ("memory=queue,torch=amp", "only the bank"),
])
def test_bad_variants_are_rejected(spec, message, capsys):
    with pytest.raises(SystemExit, match=message):
        step_time.parse_variants(step_time.parse_args(["--variants", spec]))


def test_the_authors_comparison_needs_a_checkout_of_their_code(tmp_path):
    with pytest.raises(SystemExit, match="no train_CRCKD.py there"):
        step_time.main(["--compare-authors", str(tmp_path)])
    (tmp_path / "train_CRCKD.py").write_text("")
    with pytest.raises(SystemExit, match="--model densenet_tiny would compare another"):
        step_time.main(["--compare-authors", str(tmp_path), "--model", "densenet_tiny"])


def test_the_authors_iteration_gets_contrast_indices_drawn_as_their_data_set_draws_them():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 0])
    by_class = [np.flatnonzero(labels == c) for c in range(3)]
    batch = np.array([0, 2, 1])
    idx = authors_iteration.contrast_indices(batch, by_class, 2, 50,
                                             np.random.default_rng(0))
    assert idx.shape == (3, 52) and idx.dtype == np.int64
    for y, row in zip(batch, idx):
        positives, negatives = row[:2], row[2:]
        assert len(set(positives)) == 2 and set(labels[positives]) == {y}
        assert y not in set(labels[negatives])


def test_the_share_of_cpu_time_stolen_by_the_hypervisor():
    before = [100, 0, 50, 800, 10, 0, 0, 40]
    after = [190, 0, 60, 900, 10, 0, 0, 90]  # 250 ticks, 50 of them stolen
    assert step_time.stolen_share(before, after) == pytest.approx(0.2)
    assert step_time.stolen_share(None, after) is None
    assert step_time.stolen_share(before, before) is None


def test_the_authors_data_set_reads_the_labels_from_split_csvs(tmp_path):
    authors_iteration.write_split_csvs(str(tmp_path), np.array([2, 0, 4]), num_test=2)
    train = (tmp_path / "split1_train.csv").read_text().splitlines()
    assert train == ["id_code,diagnosis", "item00000,2", "item00001,0", "item00002,4"]
    assert len((tmp_path / "split1_test.csv").read_text().splitlines()) == 3


def _xspace(planes: str):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax._src.lib import _profile_data

        return _profile_data.ProfileData.from_text_proto(planes)


GPU_TRACE = """
planes {
  id: 1 name: "/device:GPU:0"
  lines { id: 1 name: "Stream #13(Compute)" timestamp_ns: 1000
    events { metadata_id: 1 offset_ps: 0 duration_ps: 4000000 stats { metadata_id: 1 str_value: "fusion.3" } }
    events { metadata_id: 1 offset_ps: 5000000 duration_ps: 2000000 stats { metadata_id: 1 str_value: "fusion.7" } }
    events { metadata_id: 2 offset_ps: 8000000 duration_ps: 2000000 }
  }
  lines { id: 2 name: "Stream #14(MemcpyD2D)" timestamp_ns: 1000
    events { metadata_id: 4 offset_ps: 0 duration_ps: 2000000 }
  }
  lines { id: 3 name: "XLA Modules" timestamp_ns: 1000
    events { metadata_id: 3 offset_ps: 0 duration_ps: 90000000 }
  }
  event_metadata { key: 1 value { id: 1 name: "loop_add_fusion_3" } }
  event_metadata { key: 2 value { id: 2 name: "void cutlass::Kernel2<cutlass_80_tensorop>(Params)" } }
  event_metadata { key: 3 value { id: 3 name: "jit_train_step" } }
  event_metadata { key: 4 value { id: 4 name: "MemcpyD2D" } }
  stat_metadata { key: 1 value { id: 1 name: "hlo_op" } }
}
planes { id: 2 name: "/host:CPU"
  lines { id: 1 name: "python" timestamp_ns: 1000
    events { metadata_id: 1 offset_ps: 0 duration_ps: 50000000 }
  }
  event_metadata { key: 1 value { id: 1 name: "PjitFunction(train_step)" } }
}
"""


def test_profile_of_a_gpu_trace_counts_stream_kernels_once():
    total, rows, source = step_time.summarise_xspace(_xspace(GPU_TRACE), steps=2)
    assert source == "device stream lines"
    got = {name: (ms, calls) for name, ms, _, calls in rows}
    # fusion.3 and fusion.7 (by their hlo_op) are one kind; the cutlass kernel by name; the
    # derived "XLA Modules" line and the host plane are not counted.
    assert got == {"fusion": (3e-3, 1.0), "void cutlass::Kernel2": (1e-3, 0.5),
                   "MemcpyD2D": (1e-3, 0.5)}
    assert total == pytest.approx(5e-3)
    assert sum(share for _, _, share, _ in rows) == pytest.approx(1.0)


def test_profile_prefers_the_xla_ops_line_when_the_trace_has_one():
    trace = GPU_TRACE.replace('name: "XLA Modules"', 'name: "XLA Ops"')
    total, rows, source = step_time.summarise_xspace(_xspace(trace), steps=1)
    assert source == "device XLA Ops line"
    assert [name for name, *_ in rows] == ["jit_train_step"] and total == pytest.approx(0.09)


def test_profile_of_a_cpu_trace_counts_xla_thunks_on_any_thread():
    trace = """
planes { id: 1 name: "/host:CPU"
  lines { id: 1 name: "tf_XLAPjRtCpuClient/123" timestamp_ns: 0
    events { metadata_id: 1 offset_ps: 0 duration_ps: 3000000 stats { metadata_id: 1 str_value: "custom-call.6__onednn$convolution" } }
    events { metadata_id: 2 offset_ps: 0 duration_ps: 9000000 stats { metadata_id: 1 str_value: "while.2" } }
  }
  lines { id: 2 name: "tf_XLAEigen/5" timestamp_ns: 0
    events { metadata_id: 1 offset_ps: 0 duration_ps: 1000000 stats { metadata_id: 1 str_value: "custom-call.9__onednn$convolution" } }
    events { metadata_id: 3 offset_ps: 0 duration_ps: 7000000 }
  }
  event_metadata { key: 1 value { id: 1 name: "custom-call" } }
  event_metadata { key: 2 value { id: 2 name: "while" } }
  event_metadata { key: 3 value { id: 3 name: "ThreadpoolListener::Record" } }
  stat_metadata { key: 1 value { id: 1 name: "hlo_op" } }
}
"""
    total, rows, source = step_time.summarise_xspace(_xspace(trace), steps=1)
    assert source == "host events with hlo_op"
    # The while loop spans its body's ops, which count themselves.
    assert [(n, ms, c) for n, ms, _, c in rows] == [
        ("custom-call__onednn$convolution", pytest.approx(4e-3), 2.0)]


# ----------------------------------------------------------------------------- gpu_check


def test_trainer_figures_from_process_cpu_time(tmp_path):
    rows = [{"split": "train", "step": 20 * i, "images_per_s": rate, "process_cpu_s": cpu}
            for i, (rate, cpu) in enumerate([(5.0, 10.0), (50.0, 12.0), (60.0, 14.0),
                                             (70.0, 16.5)], start=1)]
    rows.insert(2, {"split": "test", "step": 40, "bacc": 0.5})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fig = gpu_check.trainer_figures(str(tmp_path), batch_size=64, warmup_records=1,
                                    child_cpu_s=999.0)
    assert fig["steps"] == 80 and fig["images_per_s_median"] == 60.0
    # (16.5 - 12.0) s over (80 - 40) steps x 64 images
    assert fig["host_cpu_ms_per_image"] == pytest.approx(1000 * 4.5 / (40 * 64))
    assert fig["host_cpu_source"].startswith("process_cpu_s")


def test_trainer_figures_fall_back_to_the_whole_run_cpu_time(tmp_path):
    rows = [{"split": "train", "step": s, "images_per_s": 10.0} for s in (2, 4, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fig = gpu_check.trainer_figures(str(tmp_path), batch_size=8, warmup_records=1,
                                    child_cpu_s=24.0)
    assert fig["host_cpu_ms_per_image"] == pytest.approx(1000 * 24.0 / (6 * 8))
    assert fig["host_cpu_source"].startswith("whole run's CPU time")


def test_a_part_past_its_limit_is_stopped_with_its_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    script = (f"import subprocess, time; p = subprocess.Popen(['sleep', '60']); "
              f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    start = time.monotonic()
    result = gpu_check.run_part([sys.executable, "-c", script], str(tmp_path / "x.log"), 3)
    assert result["status"] == "timeout" and time.monotonic() - start < 30
    child = int(pid_file.read_text())
    time.sleep(0.5)
    # The grandchild went with the group: gone, or a zombie waiting for init to reap it.
    status = pathlib.Path(f"/proc/{child}/status")
    assert not status.exists() or "State:\tZ" in status.read_text()


def test_failing_parts_do_not_stop_the_check(tmp_path):
    """Every part fails at once (an interpreter that exits 1); the check still runs each,
    records its status and writes both summaries."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), str(out), "--tiny",
         "--python", "/bin/false", "--wheels", str(tmp_path / "none"),
         "--workdir", str(tmp_path / "work"), "--budget", "120"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    status = {name: part["status"] for name, part in summary["parts"].items()}
    assert status == {"wheels": "skipped", "env": "failed", "step_b64": "failed",
                      "loop": "failed", "demo": "failed"}
    text = (out / "summary.txt").read_text()
    assert "demo       failed" in text
    assert summary["parts"]["step_b64"]["figures"]["variants"] == []


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(tmp_path):
    """The whole GPU check, every part, with tiny settings on the CPU: each part runs and
    reports its figures (torch rows skipped when this interpreter cannot import torch)."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), str(out), "--tiny",
         "--workdir", str(tmp_path / "work"), "--parts", ",".join(gpu_check.PARTS)],
        capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    parts = summary["parts"]
    assert {n: p["status"] for n, p in parts.items() if n != "wheels"} == {
        n: "ok" for n in gpu_check.PARTS if n != "wheels"}
    assert parts["env"]["figures"]["jax_backend"] == "cpu"
    torch_ok = "error" not in parts["env"]["figures"]["torch"]
    for name in ("step_b64", "step_b32"):
        variants = parts[name]["figures"]["variants"]
        assert [(v["dtype"], v["memory"], v["augment"]) for v in variants] == [
            ("bfloat16", "bank", "host"), ("float32", "bank", "host")]
        assert all(v["jax_img_s"] > 0 for v in variants)
        for v in variants:  # each has a torch partner
            assert (v.get("torch_img_s", 0) > 0) if torch_ok else v["torch"].startswith(
                "skipped")
        assert parts[name]["figures"]["profile"]["top_ops"]
    loop = parts["loop"]["figures"]
    assert loop["trainer_img_s"] > 0 and loop["step_img_s"] > 0
    assert loop["ratio"] == pytest.approx(loop["trainer_img_s"] / loop["step_img_s"], rel=1e-2)
    assert loop["trainer_cpu_ms_per_image"] > 0
    trainer = parts["trainer"]["figures"]
    assert trainer["steps"] == 8 and trainer["images_per_s_median"] > 0
    assert trainer["host_cpu_ms_per_image"] > 0
    assert trainer["step_only_images_per_s"] == loop["step_img_s"]
    kernels = parts["kernels"]["figures"]["variants"]
    assert [v["label"].split("kernels_")[1].split("-")[0] for v in kernels] == ["standard",
                                                                                  "cpu"]
    assert parts["startup"]["figures"]["cold_s"] > 0
    assert 0 <= parts["demo"]["figures"]["summary"]["final"]["bacc"] <= 1
    folds = parts["folds"]["figures"]
    assert folds["folds"] == 2 and folds["one_img_s"] > 0 and folds["stacked_img_s"] > 0
    tuner = parts["autotuner"]["figures"]
    assert set(tuner) == {"on", "off"}
    assert all(f["img_s"] > 0 and f["compile_s"] > 0 for f in tuner.values())
    text = (out / "summary.txt").read_text()
    assert "step_b64: step benchmark" in text and "loop (one process" in text
    assert "folds side by side: 2 folds" in text
    assert "fusion autotuner (fresh cache each): on: compile" in text


def test_the_step_benchmark_times_the_program_the_trainer_runs(monkeypatch):
    """step_time.py builds its JAX step with `builder.build_run`, the call `Trainer.build`
    makes: given the benchmark's settings and data, the trainer's train step lowers to the
    very program the benchmark compiles and times."""
    from types import SimpleNamespace

    from crckd_jax import builder, trainer

    built = []
    build_run = builder.build_run

    def recording(*args, **kwargs):
        built.append((args, kwargs, build_run(*args, **kwargs)))
        return built[-1][2]

    monkeypatch.setattr(builder, "build_run", recording)
    args = step_time.parse_args([
        "--model", "densenet_tiny", "--image-size", "32", "--batch-size", "4",
        "--num-items", "40", "--num-positives", "2", "--num-negatives", "8",
        "--embed-dim", "16", "--warmup", "0", "--distinct-batches", "1",
        "--augment", "device", "--kernels", "auto"])
    (variant,) = step_time.parse_variants(args)
    labels, batches = step_time.make_inputs(args, variant.batch_size)
    step_time.setup_jax(args, variant, labels, batches)
    (settings, data), kwargs, benchmark = built[0]
    assert kwargs == {"kernels": "auto"}
    fold = SimpleNamespace(class_names=data.class_names, train_labels=data.train_labels,
                           largest_fold=(0, 0))
    trained = trainer.Trainer.build(settings, fold)
    assert len(built) == 2 and built[1][2] is trained.run
    batch = benchmark.parallel.put_batch(
        {k: v for k, v in batches[0].items() if k not in ("image_student", "image_teacher")})
    program = lambda run: run.train_step.lower(  # noqa: E731
        run.abstract_state(), batch, run.step_class_weight).as_text()
    assert program(trained.run) == program(benchmark)


# ----------------------------------------------------------------------------- deviceless

def test_program_stats_count_kernels_in_loop_bodies_and_the_bytes_they_move():
    """A scan of 3 matmul + relu steps: its while body is walked once (the fused dot
    counted), free instructions are not kernels, and the bytes are those of the kernels'
    operands and results as printed."""
    import jax
    import jax.numpy as jnp

    import hlo_report

    def scanned(x, w):
        return jax.lax.scan(lambda c, _: (jax.nn.relu(c @ w), None), x, None,
                            length=3)[0].sum(0)

    text = jax.jit(scanned).lower(jnp.ones((8, 16)), jnp.ones((16, 16))).compile().as_text()
    stats = hlo_report.program_stats(text)
    assert stats.num_kernels >= 2 and not stats.collectives
    assert not {"parameter", "tuple", "get-tuple-element", "while"} & set(stats.kernels)
    assert any("dot" in k or "ynn" in k or "gemm" in k for k in stats.kernels), stats.kernels
    assert hlo_report.shape_bytes("(f32[8,16]{1,0}, bf16[4]{0}, pred[])") == 8 * 16 * 4 + 8 + 1
    # At least the matmul's operands and its result.
    assert stats.hbm_bytes >= (8 * 16 + 16 * 16 + 8 * 16) * 4
    assert stats.sliced_bytes <= stats.hbm_bytes


def test_kernels_are_counted_by_the_phase_of_the_step_they_belong_to():
    """The differentiated forward pass, the backward pass, a forward pass without gradient
    and the update outside any module are told apart by the op names JAX records."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    import hlo_report

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return jnp.tanh(nn.Dense(16)(jnp.sin(x)))

    net = Net()
    x = jnp.ones((8, 16))
    params = net.init(jax.random.key(0), x)

    def step(params, teacher, x):
        target = net.apply(teacher, x)
        loss = lambda p: jnp.sum((net.apply(p, x) - target) ** 2)
        grads = jax.grad(loss)(params)
        return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)

    text = jax.jit(step).lower(params, params, x).compile().as_text()
    stats = hlo_report.program_stats(text)
    assert sum(stats.kernels_by_phase.values()) == stats.num_kernels
    for phase in ("forward Net", "backward Net", "no gradient Net", "no gradient -"):
        assert stats.kernels_by_phase[phase] >= 1, stats.kernels_by_phase
    assert hlo_report.phase('fusion(%a), metadata={op_name="jit(s)/transpose(jvp(Net))/x"}'
                            ) == "backward Net"
    assert hlo_report.phase('fusion(%a), metadata={op_name="jit(s)/jvp()/add"}') == "forward -"
    assert hlo_report.phase('fusion(%a), metadata={op_name="jit(s)/vmap(transpose(jvp(Net)))/'
                            'x"}') == "backward Net"
    assert hlo_report.phase('fusion(%a), metadata={op_name="jit(s)/mul;jit(s)/shard_map"}'
                            ) == "no gradient -"
    assert hlo_report.phase("fusion(%a), kind=kLoop") == "no gradient -"


def test_sliced_bytes_count_what_a_fusion_reads_of_an_operand_it_slices():
    """A fusion that scales an operand and keeps a quarter of it reads a quarter (the
    tighter estimate); the upper bound counts the whole operand."""
    import hlo_report

    text = """HloModule m

%fused (p0: f32[64,128], p1: f32[64,32]) -> f32[64,32] {
  %p0 = f32[64,128]{1,0} parameter(0)
  %c = f32[64,128]{1,0} convert(%p0)
  %s = f32[64,32]{1,0} slice(%c), slice={[0:64], [0:32]}
  %p1 = f32[64,32]{1,0} parameter(1)
  ROOT %a = f32[64,32]{1,0} add(%s, %p1)
}

ENTRY %main (x: f32[64,128], y: f32[64,32]) -> f32[64,32] {
  %x = f32[64,128]{1,0} parameter(0)
  %y = f32[64,32]{1,0} parameter(1)
  ROOT %loop_add_fusion = f32[64,32]{1,0} fusion(%x, %y), kind=kLoop, calls=%fused
}
"""
    stats = hlo_report.program_stats(text)
    assert stats.num_kernels == 1
    assert stats.hbm_bytes == (64 * 128 + 2 * 64 * 32) * 4
    assert stats.sliced_bytes == (64 * 32 + 2 * 64 * 32) * 4


def test_deviceless_gpu_compiles_skip_the_fusion_autotuner_unless_asked():
    """Without a device XLA's fusion autotuner only re-compiles candidates and keeps the
    defaults (the same program); the report leaves it out on GPU targets unless asked."""
    import deviceless

    off = {"xla_gpu_experimental_enable_fusion_autotuner": False}
    h200, cpu = deviceless.TARGETS["h200"], deviceless.TARGETS["cpu"]
    assert deviceless.compiler_options(deviceless.parse_args([]), h200) == off
    on = deviceless.parse_args(["--fusion-autotuner", "on"])
    assert deviceless.compiler_options(on, h200) == {}
    assert deviceless.compiler_options(deviceless.parse_args([]), cpu) == {}


def test_deviceless_report_compiles_the_trainers_programs(capsys):
    """`deviceless.py --target cpu` (the report without an accelerator plugin) compiles the
    train and eval steps the builder makes and ends each with its RESULT line."""
    import deviceless

    results = deviceless.main([
        "--target", "cpu", "--program", "train_step,eval_step", "--model", "densenet_tiny",
        "--image-size", "32", "--batch-size", "4", "--num-items", "40",
        "--num-positives", "2", "--num-negatives", "8", "--embed-dim", "16"])
    out = capsys.readouterr().out
    assert [r["program"] for r in results] == ["train_step", "eval_step"]
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert [line.split()[2] for line in lines] == ["program=train_step", "program=eval_step"]
    train, evaluation = results
    assert train["kernels"] > evaluation["kernels"] > 10
    assert train["hbm_gib"] > evaluation["hbm_gib"] > 0


def test_deviceless_report_of_folds_side_by_side(capsys):
    """`--folds 2`: the train step of two folds stacked on a leading axis compiles as one
    program that moves about twice the bytes of one fold's."""
    import deviceless

    flags = ["--target", "cpu", "--model", "densenet_tiny", "--image-size", "32",
             "--batch-size", "4", "--num-items", "40", "--num-positives", "2",
             "--num-negatives", "8", "--embed-dim", "16"]
    (one,), (two,) = deviceless.main(flags), deviceless.main([*flags, "--folds", "2"])
    assert (one["folds"], two["folds"]) == (1, 2)
    assert 1.8 * one["hbm_gib"] < two["hbm_gib"] < 2.2 * one["hbm_gib"]
    assert "train_step of 2 folds side by side" in capsys.readouterr().out


def test_fold_stack_benchmark_runs_both_programs(capsys):
    """`fold_stack.py` trains one fold's step and the stacked step of 2 folds and ends with
    its RESULT line (the figures themselves are not checked: no timed test)."""
    import fold_stack

    result = fold_stack.main([
        "--model", "densenet_tiny", "--image-size", "32", "--batch-size", "4", "--folds", "2",
        "--num-items", "40", "--num-positives", "2", "--num-negatives", "8",
        "--embed-dim", "16", "--steps", "1", "--rounds", "1"])
    assert result["folds"] == 2 and result["one_img_s"] > 0 and result["stacked_img_s"] > 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("RESULT one_img_s=")


@pytest.mark.slow
def test_the_train_step_compiles_for_a_multi_host_tpu_slice_with_few_collectives():
    """The trainer's train step compiled for a TPU v5e-16 (4x4: 16 chips on 4 hosts) without
    a TPU (needs jax[tpu]): the gradients cross the chips in a handful of all-reduces whose
    bytes are those of the float32 parameters (plus a few scalars and BatchNorm statistics),
    the class memory is never all-gathered (only the global batch's embeddings are), and a
    chip holds well under its 16 GiB."""
    pytest.importorskip("libtpu")
    import jax

    import deviceless

    (result,) = deviceless.main([
        "--target", "tpu-v5e-16", "--model", "densenet_tiny", "--image-size", "32",
        "--batch-size", "4", "--num-items", "512", "--num-positives", "2",
        "--num-negatives", "8", "--embed-dim", "16"])
    args = deviceless.parse_args(["--model", "densenet_tiny", "--image-size", "32",
                                  "--num-items", "512", "--embed-dim", "16"])
    run = deviceless.build(args, jax.devices("cpu")[:1])
    params = jax.eval_shape(run.create_state).params
    param_gib = sum(x.size * 4 for x in jax.tree.leaves(params)) / 2**30
    assert result["compiled"] == 1 and 1 <= result["collectives"] <= 8
    assert param_gib <= result["allreduce_gib"] <= 1.5 * param_gib + 1e-4
    bank_gib = 2 * 512 * 16 * 4 / 2**30  # the student's and the teacher's rows, float32
    assert 0 < result["allgather_gib"] < bank_gib / 4
    assert result["per_chip_gib"] < 16
