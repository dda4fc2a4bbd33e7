"""`rasa-lora compare` when every value is zero (a first tiny run): the chart still says what it shows."""

from __future__ import annotations

import json

from rasa_lora import reproduce


def test_an_all_zero_comparison_is_titled_and_labelled(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    saved = []
    real_savefig = Figure.savefig

    def keep(self, *args, **kwargs):
        saved.append(self)
        return real_savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    content = {"method": "rasa", "r": 8, "base_model": None, "dataset": None,
               "results": [{"task": "gsm8k", "metric": "accuracy", "last": 0.0, "paper_last": None, "items": 3,
                            "limit": 3}]}
    for name in ("try-1", "try-2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "reproduce.json").write_text(json.dumps(content))
    assert reproduce.compare_main([str(tmp_path / "try-1"), str(tmp_path / "try-2"), "--out",
                                   str(tmp_path / "c")]) == 0
    (axis,) = saved[0].axes
    texts = [text.get_text() for text in axis.texts]
    assert axis.get_title()  # was untitled
    assert texts.count("0.0") == 2 and "every value is 0" in texts  # was an empty frame
    assert axis.get_ylim()[1] > 0
