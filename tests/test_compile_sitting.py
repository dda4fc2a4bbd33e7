"""benchmarks/compile_sitting.sh (issue 24's GPU sitting; DRY_RUN=1 prints its commands): the stages in order, the
test that failed last time first and stopping at its first failure, every benchmark command parsed by its script's
own parser (and its recipe by the trainer's), no stage wrapped in `timeout`."""

import shlex
import subprocess
from pathlib import Path

from rasa_lora.train.cli import recipe_values
from rasa_lora.train.config import build_config
from tests.benchmark_scripts import load_benchmark

REPO = Path(__file__).resolve().parents[1]


def test_the_compile_sitting_runs_every_stage_with_valid_arguments(tmp_path):
    printed = subprocess.run(["bash", str(REPO / "benchmarks" / "compile_sitting.sh")], cwd=REPO,
                             env={"DRY_RUN": "1", "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                             check=True).stdout.splitlines()
    names = [line.split(":")[0] for line in printed]
    assert names == ["test-checkpointed-graphs", "kernels-smollm2", "test-compile", "host-llama-1b", "host-keep-u-off",
                     "train-eager", "train-graphs", "tests-gpu", "host-llama-8b"]
    assert not any("timeout" in line for line in printed)
    commands = {name: shlex.split(line.split(": ", 1)[1]) for name, line in zip(names, printed, strict=True)}
    first = commands["test-checkpointed-graphs"]
    assert "-x" in first and first[-1].endswith("::test_reduce_overhead_training_steps_equal_eager")
    assert (REPO / first[-1].split("::")[0]).is_file()
    host_time, throughput = load_benchmark("host_time"), load_benchmark("train_throughput")
    kernel_timing = load_benchmark("kernel_timing")
    for name, argv in commands.items():
        if argv[:2] == ["env", "RASA_LORA_KEEP_U=0"]:
            argv = argv[2:]
        if argv[:2] == ["python3", "benchmarks/host_time.py"]:
            args = host_time.build_parser().parse_args(argv[2:])
            assert set(args.shapes.split(",")) <= set(host_time.SHAPES), name
            assert all(mode == "eager" or mode.startswith("compile") for mode in args.modes.split(",")), name
        elif argv[:2] == ["python3", "benchmarks/kernel_timing.py"]:
            args = kernel_timing.build_parser().parse_args(argv[2:])
            assert args.model == "smollm2" and args.tokens == "8192", name
        elif argv[:2] == ["python3", "benchmarks/train_throughput.py"]:
            own, recipe = throughput.split_argv(argv[2:])
            args = throughput.build_parser().parse_args(own)
            assert set(args.variants.split(",")) == {"frozen", "rasa", "lora"}
            config = build_config({**recipe_values(recipe), "output_dir": str(tmp_path)})
            assert config.micro_batch_size == 32 and config.cutoff_len == 512
            if name == "train-graphs":
                assert config.compile and config.compile_mode == "reduce-overhead" and config.pad_to_multiple_of == 64
        else:
            assert argv[:3] == ["python3", "-m", "pytest"] and "-m" in argv[3:] and "gpu" in argv, name


def test_a_stage_logs_its_command_exit_status(tmp_path):
    """benchmarks/sitting_steps.sh's `step`: each stage's output in its log, its exit status in stages.log (a `$(date)`
    in the same line once reset it to 0 for every stage), and the next stage still runs."""
    steps = REPO / "benchmarks" / "sitting_steps.sh"
    script = f'P={tmp_path}; . "{steps}"; step bad sh -c "echo out; exit 3"; step good true'
    subprocess.run(["bash", "-c", script], check=True)
    log = (tmp_path / "stages.log").read_text().splitlines()
    assert [line.split("] ", 1)[1] for line in log] == ["bad started", "bad ended (3)", "good started",
                                                        "good ended (0)"]
    assert (tmp_path / "bad.log").read_text() == "out\n"


def test_skip_leaves_the_named_stages_out(tmp_path):
    """SKIP=NAME,...: the stages a sitting already measured are left out, logged as skipped; the others run."""
    steps = REPO / "benchmarks" / "sitting_steps.sh"
    script = f'P={tmp_path}; SKIP=one,three; . "{steps}"; step one true; step two true; step three true; step onex true'
    subprocess.run(["bash", "-c", script], check=True)
    log = [line.split("] ", 1)[1] for line in (tmp_path / "stages.log").read_text().splitlines()]
    assert log == ["one skipped", "two started", "two ended (0)", "three skipped", "onex started", "onex ended (0)"]
    printed = subprocess.run(["bash", str(REPO / "benchmarks" / "compile_sitting.sh")], cwd=REPO,
                             env={"DRY_RUN": "1", "SKIP": "kernels-smollm2", "PATH": "/usr/bin:/bin"},
                             capture_output=True, text=True, check=True).stdout.splitlines()
    assert "kernels-smollm2: skipped" in printed and len(printed) == 9
