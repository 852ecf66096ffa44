"""tools/shade_tokens.py: the HTML and the PNG exist, hold every token, and their colours span the scale."""
import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENS = ["<copy>", " s3", " s7", " <sep>", " s3", " s7", " <eos>", "\ndef", " main", "(", "):", "\n", "    return",
          " 42 & <b>"]
TEMPS = [None, None, None, None, 0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 0.3, 0.5, 0.9, 0.1]


def spans(doc):
    return re.findall(r'<span class="tok( prompt)?" data-index="(\d+)" data-tau="([^"]*)"[^>]*'
                      r'style="background:(#[0-9a-f]{6});color:(#[0-9a-f]{6})">', doc)


def test_html_has_every_token_with_its_colour(tmp_path):
    from megatron_tempnet.adaptive.shade import PROMPT_COLOUR, colour, hex_colour, render_html

    path = tmp_path / "out.html"
    doc = render_html(TOKENS, TEMPS, str(path), vmin=0.0, vmax=1.0)
    assert path.read_text(encoding="utf-8") == doc
    found = spans(doc)
    assert len(found) == len(TOKENS)
    assert [int(i) for _, i, _, _, _ in found] == list(range(len(TOKENS)))
    for (prompt, _, tau, bg, _), t in zip(found, TEMPS):
        if t is None:
            assert prompt and tau == "" and bg == hex_colour(PROMPT_COLOUR)
        else:
            assert float(tau) == pytest.approx(t) and bg == hex_colour(colour(t))
    bgs = {bg for _, _, _, bg, _ in found}
    assert hex_colour(colour(0.0)) in bgs and hex_colour(colour(1.0)) in bgs  # both ends of the scale
    assert "&amp; &lt;b&gt;" in doc  # token text is escaped
    assert '<span class="vmin">0</span>' in doc and '<span class="vmax">1</span>' in doc


def test_colour_scale_runs_blue_to_red_and_range_defaults_to_data():
    from megatron_tempnet.adaptive.shade import colour, prepare

    lo, mid, hi = colour(0.0), colour(0.5), colour(1.0)
    assert lo[2] > lo[0] and hi[0] > hi[2] and min(mid) > 180  # blue, pale, red
    assert colour(-3) == lo and colour(7) == hi
    s = prepare(["a", "b", "c"], [None, 0.3, 0.9])
    assert (s.vmin, s.vmax) == (0.3, 0.9)
    assert s.background(1) == lo and s.background(2) == hi


def test_png_dimensions_token_boxes_and_colours(tmp_path):
    from PIL import Image

    from megatron_tempnet.adaptive.shade import PROMPT_COLOUR, colour, render_png

    path = tmp_path / "out.png"
    img, boxes = render_png(TOKENS, TEMPS, str(path), vmin=0.0, vmax=1.0, width=640, font_size=16)
    with Image.open(path) as png:
        assert png.size == (640, img.height) and png.mode == "RGB"
        png = png.convert("RGB")
        assert sorted({b.index for b in boxes}) == list(range(len(TOKENS)))  # every token drawn
        assert all(0 <= b.x0 < b.x1 <= 640 and 0 <= b.y0 < b.y1 <= png.height for b in boxes)
        rows = sorted({b.y0 for b in boxes})
        assert len(rows) >= 3  # the two newlines start new lines
        assert png.height > rows[-1] + 40  # the legend is below the text
        for b in boxes:  # the box's corner (no glyph there) has the token's colour
            t = TEMPS[b.index]
            want = PROMPT_COLOUR if t is None else colour(t)
            assert png.getpixel((b.x0, b.y0)) == want, (b, t)
        # the legend bar spans the whole scale
        pixels = {c for _, c in png.getcolors(maxcolors=1 << 20)}
        assert colour(0.0) in pixels and colour(1.0) in pixels


def test_png_wraps_long_text(tmp_path):
    from megatron_tempnet.adaptive.shade import render_png

    tokens = [f" word{i}" for i in range(200)]
    img, boxes = render_png(tokens, [i / 199 for i in range(200)], None, width=300)
    assert img.width == 300 and len({b.y0 for b in boxes}) > 10
    assert all(b.x1 <= 300 for b in boxes)


@pytest.mark.parametrize("tokens, temps, needle", [
    ([], [], "no tokens"),
    (["a", "b"], [0.1], "2 tokens but 1 temperatures"),
    (["a", "b"], [0.1, float("nan")], "not a finite number"),
])
def test_bad_input_is_refused(tokens, temps, needle):
    from megatron_tempnet.adaptive.lm import AdaptiveError
    from megatron_tempnet.adaptive.shade import render_html

    with pytest.raises(AdaptiveError, match=needle):
        render_html(tokens, temps)


def test_piece_text():
    from megatron_tempnet.adaptive.shade import piece_text

    assert piece_text("\u2581def") == " def" and piece_text("<0x0A>") == "\n" and piece_text("<0x3A>") == ":"
    assert piece_text("<0x9C>") == "<0x9C>" and piece_text("<unk>") == "<unk>"


def test_cli_from_json(tmp_path):
    from PIL import Image

    src = tmp_path / "gen.json"
    src.write_text(json.dumps({"tokens": TOKENS, "temperatures": TEMPS}))
    html, png = tmp_path / "g.html", tmp_path / "g.png"
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "shade_tokens.py"), "--input", str(src),
                        "--html", str(html), "--png", str(png), "--width", "500"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(spans(html.read_text(encoding="utf-8"))) == len(TOKENS)
    with Image.open(png) as im:
        assert im.width == 500 and im.height > 60
    bad = tmp_path / "bad.json"
    bad.write_text("{\"tokens\": [1]}")
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "shade_tokens.py"), "--input", str(bad),
                        "--html", str(html)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "'tokens' and 'temperatures'" in r.stderr


# -- generated texts: our checkpoint and its Hugging Face conversion give the same picture ------------------------


def _run(args, timeout=300):
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)


@pytest.mark.slow
def test_shading_from_hf_folder_equals_shading_from_checkpoint(tmp_path):
    """Sampling (top-k, seeded) with TempNet's temperatures from one of our checkpoints and from its Hugging Face
    conversion gives the same tokens with the same temperatures, so the same picture."""
    from megatron_tempnet.data.tokenizer import train_sentencepiece
    from test_data_tokenizer import make_texts

    train_sentencepiece(make_texts(), str(tmp_path / "tok"), 300, threads=1)
    proc = _run(["-m", "megatron_tempnet.train", "--config", "examples/configs/tiny_gpt.yaml", "--vocab-size", "300",
                 "--tokenizer-model", str(tmp_path / "tok.model"), "--num-layers", "2", "--hidden-size", "32",
                 "--num-attention-heads", "4", "--seq-length", "32", "--train-iters", "2", "--eval-interval", "0",
                 "--eval-iters", "1", "--tempnet-enabled", "--tempnet-hidden-size", "16", "--dro-target-entropy", "3",
                 "--save", str(tmp_path / "ckpt")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    conv = _run(["tools/convert_to_hf.py", "--load", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")])
    assert conv.returncode == 0, conv.stderr[-3000:]
    common = ["--prompt", "def f(x):", "--max-new-tokens", "8", "--top-k", "20", "--seed", "3"]
    out = {}
    for src in ("load", "hf"):
        r = _run(["tools/shade_tokens.py", f"--{src}", str(tmp_path / ("ckpt" if src == "load" else "hf")), *common,
                  "--html", str(tmp_path / f"{src}.html"), "--png", str(tmp_path / f"{src}.png"),
                  "--save-json", str(tmp_path / f"{src}.json")])
        assert r.returncode == 0, r.stderr[-3000:]
        out[src] = json.loads((tmp_path / f"{src}.json").read_text())
    a, b = out["load"], out["hf"]
    assert a["tokens"][0] == "def f(x):" and a["temperatures"][0] is None
    assert len(a["tokens"]) >= 2
    assert a["tokens"] == b["tokens"]  # the same sampled tokens
    torch_close = [abs(x - y) < 1e-4 for x, y in zip(a["temperatures"][1:], b["temperatures"][1:])]
    assert all(torch_close), (a["temperatures"], b["temperatures"])
    assert all(0.5 <= t <= 5.0 for t in a["temperatures"][1:])  # TempNet's GPT bounds
    assert len(spans((tmp_path / "hf.html").read_text(encoding="utf-8"))) == len(b["tokens"])
