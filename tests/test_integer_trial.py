"""The integer trial runs on a converted pipeline folder and prints each consumer's rounding error."""

from __future__ import annotations

import re

from pipeline_support import inside, prepare, tiny_params

from benchmarks.integer_trial import main


def test_the_trial_prints_every_consumer_with_errors_that_grow_as_bits_fall(tmp_path, capsys):
    folder = prepare(tmp_path, tiny_params(), ("download-teacher", "split", "calibrate", "convert"))
    with inside(folder):
        assert main(["--blocks", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("2 FFNs, 64 tokens, T = 5")
    cells = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]] for line in lines[3:]}
    assert set(cells) == {"gate", "up", "down"}
    # the tiny model: 64 inputs to gate and up (groups of 128 do not tile them), 128 to down
    assert cells["gate"][1] == cells["gate"][2] == "-" and "-" not in cells["down"]
    for consumer, row in cells.items():
        value = {name: float(re.match(r"(\d\.\d+) \(", cell).group(1)) for name, cell in
                 zip(("int8", "int8_g128", "int4_g128", "int4_g64", "w8a8"), row) if cell != "-"}
        assert 0 < value["int8"] < 0.05 and 0 < value["w8a8"] < 0.1, consumer
        assert value["int4_g64"] > 2 * value["int8"], consumer  # 16x coarser steps
