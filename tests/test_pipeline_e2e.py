"""The end-to-end input pipeline (vl2lab.perf.pipeline_e2e): worker processes give the main process's batches, in
file order; the answers are the model's own on those batches; a bad file is one error naming it; the ladder's
``--e2e`` part is recorded and reported."""
import inspect
import json
import multiprocessing

import pytest
import torch

from vl2lab.inputs.processor import ProcessorError
from vl2lab.inputs.tiling import open_image
from vl2lab.model.vl2 import build_model
from vl2lab.perf import ladder, report
from vl2lab.perf.pipeline_e2e import Collate, batches, measure_end_to_end
from vl2lab.perf.workload import answer_tokens
from vl2lab.perf.workload import workload_image
from vl2lab.weights.pretrained import project_processor

SIZES = [(384, 384), (500, 300), (300, 600), (768, 384), (400, 400)]     # 5 files: batches of 2, 2, 1


@pytest.fixture(scope="module")
def model():
    vl2 = build_model("random-tiny", seed=0)
    return vl2, project_processor(vl2.config)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pictures")
    out = []
    for i, size in enumerate(SIZES):
        out.append(str(folder / f"p{i}.png"))
        workload_image(seed=i, size=size).save(out[-1])
    return out


def direct(processor, paths, b=2):
    """The processor on the pictures opened here, in the same chunks: what the pipeline must give."""
    conv = Collate(processor).conversation
    return [processor(conversations=[conv] * len(paths[i:i + b]), images=[[open_image(p)] for p in paths[i:i + b]])
            for i in range(0, len(paths), b)]


def test_workers_give_the_main_process_batches_in_file_order(model, paths):
    _, proc = model
    main = list(batches(proc, paths, 2, num_workers=0))
    workers = list(batches(proc, paths, 2, num_workers=2))
    ref = direct(proc, paths)
    assert [b["input_ids"].shape[0] for b in workers] == [2, 2, 1]
    for a, w, r in zip(main, workers, ref, strict=True):
        assert set(a) == set(w) == set(r) >= {"input_ids", "images", "images_seq_mask", "images_spatial_crop"}
        for k in r:
            assert torch.equal(a[k], r[k]) and torch.equal(w[k], r[k]), k
    assert not torch.equal(ref[0]["images_spatial_crop"], ref[1]["images_spatial_crop"])   # order is visible


@pytest.mark.parametrize("workers", [0, 2])
def test_answers_are_the_models_own_and_the_times_add_up(model, paths, workers):
    vl2, proc = model
    r = measure_end_to_end(vl2, proc, paths, 2, workers, new_tokens=3, device="cpu")
    want = torch.cat([answer_tokens(vl2, b, 3) for b in direct(proc, paths)])
    assert torch.equal(r["tokens"], want) and r["tokens"].shape == (5, 3)
    assert (r["images"], r["batches"], r["batch"], r["num_workers"]) == (5, 3, 2, workers)
    assert len(r["batch_s"]) == len(r["wait_s"]) == 3
    assert all(t > 0 for t in r["batch_s"]) and all(w >= 0 for w in r["wait_s"]) and r["fill_s"] > 0
    assert all(w <= t for w, t in zip(r["wait_s"], r["batch_s"]))
    assert 0 < sum(r["batch_s"]) <= r["wall_s"] and r["images_per_s"] == pytest.approx(5 / r["wall_s"])
    assert r["waited_s"] == pytest.approx(sum(r["wait_s"])) and 0 < r["wait_fraction"] < 1
    assert r["batch_stats_s"]["n"] == r["wait_stats_s"]["n"] == 3


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("bad", ["missing", "corrupt"])
def test_a_bad_file_is_one_error_naming_it(model, paths, tmp_path, workers, bad):
    vl2, proc = model
    path = tmp_path / f"{bad}.png"
    if bad == "corrupt":
        path.write_bytes(b"not a picture")
    files = paths[:3] + [str(path)] + paths[3:]                        # in the second batch
    with pytest.raises(ProcessorError) as e:
        list(batches(proc, files, 2, workers))
    msg = str(e.value)
    assert str(path) in msg and "Traceback" not in msg and "worker" not in msg.lower() and "\n" not in msg
    assert not multiprocessing.active_children()                       # the workers stopped
    with pytest.raises(ProcessorError, match=str(path)):
        measure_end_to_end(vl2, proc, files, 2, workers, new_tokens=2)


def test_ladder_e2e_is_recorded_and_reported(tmp_path):
    out = tmp_path / "ladder_random-tiny_1.json"
    res = ladder.run("random-tiny", "cpu", (1, 2), repeats=1, warmup=0, rungs=(4,), new_tokens=2, out=str(out),
                     log=lambda *_: None, e2e=True, e2e_workers=2, e2e_images=4)
    e = json.loads(out.read_text())["end_to_end"]
    assert e == json.loads(json.dumps(res["end_to_end"]))
    assert (e["rung"], e["batch"], e["images"]) == (ladder.RUNGS[3].name, 2, 4) and e["same_tokens"]
    assert [r["num_workers"] for r in e["runs"]] == [0, 2] and all(r["images_per_s"] > 0 for r in e["runs"])
    ready = next(r for r in res["runs"] if r["batch"] == 2)
    assert e["ready_batch_images_per_s"] == ready["images_per_s"]
    assert e["runs"][0]["tokens"] == ready["tokens"]                   # the files decode to the workload's pixels
    rows = report.end_to_end_rows(report.load(str(tmp_path), "random-tiny"))
    assert [r["workers"] for r in rows] == [0, 2] and all(r["file"] == out.name for r in rows)
    assert rows[1]["vs_ready"] == pytest.approx(e["runs"][1]["images_per_s"] / ready["images_per_s"])
    assert inspect.signature(ladder.run).parameters["e2e"].default is False                      # off by default
    assert ladder.parser().parse_args([]).e2e is False and ladder.parser().parse_args(["--e2e"]).e2e is True
