"""User errors of the command lines (``python -m kernelssl.train``, ``python -m kernelssl.bench``): each
ends in exit status 2 and exactly one ``error:`` line on stderr, never a traceback.  Most checks call
``main()`` in-process (the same code path, without a Python start-up each); a few run the real process."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest
import torch

from kernelssl import train
from kernelssl.bench import __main__ as bench

TINY = ["--subset", "256", "--batch-size", "128", "--width", "8", "--proj-hidden", "64", "--probe-repeats", "1",
        "--workers", "0", "--threads", "1", "--no-progress", "--epochs", "2"]


def _fails(main, argv, capsys, *needles: str) -> str:
    """``main(argv)`` exits 2 (returned or raised) with one stderr line, ``error: ...``, naming ``needles``."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, (argv, code, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), (argv, err)
    for n in needles:
        assert n in lines[0], (argv, n, lines[0])
    return lines[0]


PARSE_ERRORS = [
    (["--proj-dim", "0"], "--proj-dim"), (["--proj-dim", "1"], "--proj-dim"), (["--batch-size", "1"], "--batch-size"),
    (["--lr", "-1"], "--lr"), (["--weight-decay", "-1"], "--weight-decay"), (["--gamma", "-1"], "--gamma"),
    (["--num-features", "0"], "--num-features"), (["--loss", "mec", "--order", "0"], "--order"),
    (["--loss", "mec", "--eps-sq", "0"], "--eps-sq"), (["--kernel-scale", "nan"], "--kernel-scale"),
    (["--loss", "uniformity", "--unif-t", "0"], "--unif-t"), (["--ema", "5"], "--ema"),
    (["--warmup-epochs", "-5"], "--warmup-epochs"), (["--probe-repeats", "0"], "--probe-repeats"),
    (["--probe-labels", "-1"], "--probe-labels"), (["--loss", "mec", "--mec-warmup", "-1"], "--mec-warmup"),
    (["--loss", "hsic", "--coefficients", "1", "2"], "--coefficients"),
    (["--loss", "sfrik", "--gamma", "2"], "--gamma"), (["--loss", "sfrik", "--coefficients", "1", "inf"], "finite"),
    (["--lr", "inf"], "--lr"),
    (["--loss", "sfrik", "--probe-c", "0"], "--probe-c"), (["--scale-lr", "-1"], "--scale-lr"),
    (["--loss", "uniformity", "--align-alpha", "0"], "--align-alpha"),
    (["--loss", "uniformity", "--unif-weight", "-1"], "--unif-weight"),
    (["--loss", "sfrik", "--sim-weight", "-5"], "--sim-weight"), (["--loss", "sfrik", "--mmd-weight", "-1"], "--mmd"),
    (["--seed", "-1"], "--seed"), (["--loss", "sfrik", "--seed", "18446744073709551616"], "--seed"),
    (["--loss", "sfrik", "--ema", "0.5"], "--ema"), (["--loss", "uniformity", "--pred-hidden", "128"], "--pred-hidden"),
    (["--loss", "mec", "--gamma", "7", "--num-features", "3"], "--num-features, --gamma"),
    (["--loss", "hsic", "--eps-sq", "1"], "--eps-sq"), (["--loss", "sfrik", "--mec-check", "raise"], "--mec-check"),
    (["--loss", "sfrik", "--hsic-kernel", "laplace"], "--hsic-kernel"),
    (["--loss", "hsic", "--learn-scale", "0", "--scale-lr", "5"], "--scale-lr"),
]


def test_train_refuses_bad_options(tmp_path, capsys):
    for argv, flag in PARSE_ERRORS:
        _fails(train.main, [*argv, "--out", str(tmp_path / "o")], capsys, flag)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    _fails(train.main, ["--out", str(a_file)], capsys, "--out", "is a file")
    _fails(train.main, ["--dataset", "cifar10", "--data-dir", str(a_file), "--out", str(tmp_path / "o")], capsys,
           "--data-dir", "is a file")
    for spec in ("foo", "meta", "cuda:99" if torch.cuda.is_available() else "cuda"):
        _fails(train.main, ["--device", spec, "--out", str(tmp_path / "o"), *TINY], capsys, "--device")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A one-epoch hsic run stopped before its second epoch (its OUT folder)."""
    out = str(tmp_path_factory.mktemp("ckpt") / "run")
    assert train.main(["--loss", "hsic", "--out", out, *TINY, "--stop-after", "1"]) == 0
    return out


RESUME_CHANGES = [["--gamma", "2"], ["--num-features", "64"], ["--kernel-scale", "0.5"], ["--learn-scale", "0"],
                  ["--scale-lr", "0.1"]]


def test_resume_refuses_other_loss_settings(checkpoint, capsys):
    for change in RESUME_CHANGES:
        line = _fails(train.main, ["--loss", "hsic", "--out", checkpoint, *TINY, "--resume", *change], capsys,
                      change[0], "in the checkpoint")
        assert "now" in line
    line = _fails(train.main, ["--loss", "hsic", "--out", checkpoint, *TINY, "--resume", "--gamma", "2",
                               "--num-features", "64"], capsys, "--gamma 1.0 in the checkpoint, 2.0 now",
                  "--num-features 512 in the checkpoint, 64 now")


def test_resume_refuses_what_is_not_a_checkpoint(tmp_path, capsys):
    good = open(os.path.join(os.path.dirname(__file__), "..", "setup.py"), "rb").read()
    bad = {"random bytes": os.urandom(256), "truncated": good[:10], "a pickled list": pickle.dumps([1, 2, 3])}
    buf = tmp_path / "list.pt"
    torch.save([1, 2, 3], buf)
    bad["a saved list"] = buf.read_bytes()
    for name, data in bad.items():
        out = tmp_path / name.replace(" ", "_")
        out.mkdir()
        (out / "checkpoint.pt").write_bytes(data)
        _fails(train.main, ["--loss", "sfrik", "--out", str(out), *TINY, "--resume"], capsys,
               "is not a kernelssl checkpoint")
    out = tmp_path / "dir"
    (out / "checkpoint.pt").mkdir(parents=True)
    _fails(train.main, ["--loss", "sfrik", "--out", str(out), *TINY, "--resume"], capsys,
           "is not a kernelssl checkpoint")


def test_bench_refuses_bad_options(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [(["--device", "foo"], "--device"), (["--device", "meta"], "--device"),
             (["--out", str(a_file)], "--out"), (["--impl", "eager-compiled", "--no-compile"], "--no-compile")]
    if not torch.cuda.is_available():
        cases += [(["--device", "cuda"], "--device cuda"), (["--impl", "triton-ieee"], "--impl triton-ieee")]
    for argv, flag in cases:
        _fails(bench.main, [*argv, "--smoke"], capsys, flag)


def test_hsic_normalises_half_views_in_fp32():
    """The norm is taken in fp32 and the unit rows rounded once to the views' dtype: fp16 rows of norm 7e4
    (finite; a norm taken in fp16 overflowed and zeroed every row) give the loss of those rounded unit rows,
    and every 16-bit input the loss of its fp32-normalised rows rounded to its dtype."""
    from kernelssl import HSICLoss
    g = torch.Generator().manual_seed(1)
    za, zb = (torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=1) * 7e4 for _ in range(2))
    for exact in (True, False):
        crit = HSICLoss(exact=exact, num_features=64)
        plain = HSICLoss(exact=exact, num_features=64, normalize=False)
        feats = None if exact else crit.draw_features(16)
        kw = {} if exact else {"features": feats}
        a, b = za.half(), zb.half()
        ua, ub = (torch.nn.functional.normalize(v.float(), dim=1).half() for v in (a, b))
        assert ua.abs().max() > 0  # the overflow zeroed these rows
        torch.testing.assert_close(crit(a, b, **kw), plain(ua, ub, **kw), rtol=1e-6, atol=1e-7)
    crit = HSICLoss(num_features=64)
    plain = HSICLoss(num_features=64, normalize=False)
    feats = crit.draw_features(5)
    za, zb = torch.randn(8, 5, generator=g) * 3, torch.randn(8, 5, generator=g) * 3
    for dt in (torch.bfloat16, torch.float16):
        a, b = za.to(dt), zb.to(dt)
        ua, ub = (torch.nn.functional.normalize(v.float(), dim=1).to(dt) for v in (a, b))
        torch.testing.assert_close(crit(a, b, features=feats), plain(ua, ub, features=feats), rtol=1e-6, atol=1e-7)


def _process(module: str, *argv: str, env=None):
    proc = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, timeout=300,
                          env=env)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_real_processes_exit_2_with_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # a plain CPU machine
    if not torch.cuda.is_available():
        line = _process("kernelssl.train", "--backend", "triton", "--device", "cpu", "--out", str(tmp_path / "o"),
                        *TINY, env=env)
        assert "--backend triton" in line
    assert "--ema" in _process("kernelssl.train", "--ema", "5", "--out", str(tmp_path / "o"))
    assert "--device" in _process("kernelssl.bench", "--device", "foo", "--smoke")


def test_bench_repeated_list_flags_add_up():
    """A repeated --loss (or --dtype, --impl) kept only the last one given."""
    args = bench.parse_args(["--loss", "hsic", "--loss", "mec", "hsic", "--dtype", "fp32", "--dtype", "fp32",
                             "--impl", "eager", "--impl", "limit", "--device", "cpu"])
    assert (args.loss, args.dtype, args.impl) == (["hsic", "mec"], ["fp32"], ["eager", "limit"])
    assert bench.parse_args(["--device", "cpu"]).loss == list(bench.LOSSES)
