"""The run's own voice: state lines, ETA from history, library noise filtered but never errors."""

from quantgate.progress import MARK, History, RunView, is_noise, parse_event, tail_of_log


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_event_marker_round_trip_and_garbage_ignored():
    assert parse_event(MARK + '{"stage": "perplexity", "state": "running"}\n') == {"stage": "perplexity",
                                                                                  "state": "running"}
    # a progress bar left on the same line by \r does not hide the marker
    assert parse_event("50%|###  \r" + MARK + '{"stage": "load_test", "state": "done"}')["state"] == "done"
    assert parse_event(MARK + "{not json") is None
    assert parse_event(MARK + '{"stage": "rm -rf", "state": "running"}') is None
    assert parse_event("plain output") is None


def test_known_noise_is_filtered_but_errors_never_are():
    assert is_noise("W1130 Failed to load /x/_C_mxfp8.abi3.so: undefined symbol")
    assert is_noise(" 45%|████▌     | 9/20 [00:01<00:02,  4.5it/s]")
    assert is_noise("INFO  Packing model.layers.0.self_attn.q_proj")
    assert not is_noise("RuntimeError: shape mismatch in q_proj")
    assert not is_noise("Traceback (most recent call last):")
    assert not is_noise("GPTQ gptq-w4g64 via GPTQModel 5.0 on cpu: 32 windows × 256 tokens")


def test_tail_of_log_keeps_the_error(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("INFO  loading\n 10%|#  | 1/10\nTraceback (most recent call last):\nValueError: bad group size\n")
    assert tail_of_log(log) == ["Traceback (most recent call last):", "ValueError: bad group size"]


def test_plain_view_prints_one_line_per_state_change_with_eta_from_history(tmp_path):
    hist = History(tmp_path / "h.json")
    hist.record("a", "quantize", 10)
    hist.record("a", "perplexity", 20)
    clock, lines = Clock(), []
    view = RunView(["a"], ["quantize", "perplexity"], hist, live=False, write=lines.append, clock=clock)
    assert view.eta() == 30
    view.set("a", "quantize", "running")
    view.set("a", "quantize", "running")  # not a change: no line
    view.set("a", "quantize", "progress", done=1, total=4)  # progress is not a state change either
    clock.t = 8
    assert view.remaining("a", "quantize") == 24  # 1 of 4 in 8 s: 3 more take 24 s
    view.set("a", "quantize", "done")
    view.set("a", "perplexity", "running")
    clock.t = 38
    view.set("a", "perplexity", "failed", detail="ValueError: boom")
    assert len(lines) == 4
    assert "quantize" in lines[0] and "running (last time 10s)" in lines[0] and "ETA 30s" in lines[0]
    assert "done in 8s" in lines[1] and "ETA 20s" in lines[1]
    assert "failed in 30s: ValueError: boom" in lines[3] and "[2/2" in lines[3]
    # the next run of the recipe expects what this one measured; failures do not teach it
    again = History(tmp_path / "h.json")
    assert again.expected("a", "quantize") == 8 and again.expected("a", "perplexity") == 20


def test_eta_unknown_until_every_step_has_history():
    view = RunView(["a", "b"], ["quantize"], History(None), write=lambda s: None, clock=Clock())
    assert view.eta() is None
    view.set("a", "quantize", "cached")
    view.set("b", "quantize", "cached")
    assert view.eta() == 0


def test_live_table_renders_every_state():
    from rich.console import Console

    view = RunView(["a"], ["quantize", "perplexity", "load_test"], History(None), clock=Clock())
    view.set("a", "quantize", "cached")
    view.set("a", "perplexity", "running")
    view.set("a", "perplexity", "progress", done=2, total=8)
    console = Console(record=True, width=120)
    console.print(view.table())
    text = console.export_text()
    assert "cached" in text and "running 0s 2/8" in text and "queued" in text and "ETA after the first run" in text
