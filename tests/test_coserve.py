"""Training and inference interleaved in one engine: timing changes, results do not."""

import pytest
from conftest import PROMPTS, run_until_done
from test_training import FAST, RECORDS, train_to_end

from fineinfer_jupyter.engine.config import EngineConfig, Slo
from fineinfer_jupyter.engine.engine import Engine
from fineinfer_jupyter.engine.outputs import IterationKind

RECORDS8 = RECORDS + [
    {"prompt": p["prompt"] + " Again?", "completion": p["completion"]} for p in RECORDS
]
JOB = dict(FAST, batch_size=8, micro_batch_size=4, max_steps=20, checkpoint_every=100)


def alone_losses(tmp_path):
    with Engine(EngineConfig(model="tiny", data_dir=tmp_path / "alone"), thread=False) as e:
        return [
            loss
            for _, loss in train_to_end(e, e.tune("herb", RECORDS8, **JOB)["id"])["loss_history"]
        ]


def alone_tokens(tmp_path, adapter_dirs, plan):
    with Engine(EngineConfig(model="tiny", data_dir=tmp_path / "infer"), thread=False) as e:
        e.load_adapter("alpha", adapter_dirs["alpha"])
        streams = [e.generate(p, adapter=a, max_new_tokens=12) for a, p in plan]
        run_until_done(e, streams)
        return [s.final["token_ids"] for s in streams]


def test_regrouped_micro_batches_give_the_same_loss_at_every_step(tmp_path):
    expected = alone_losses(tmp_path)
    with Engine(EngineConfig(model="tiny", data_dir=tmp_path / "regroup"), thread=False) as e:
        job = e.tune("herb", RECORDS8, **JOB)
        sizes = [1, 3, 2, 4, 1, 1, 2]
        i = 0
        while e.core.trainer.active:
            e.core.trainer.micro_step(
                sizes[i % len(sizes)]
            )  # as the deferred policy might size them
            i += 1
        got = [loss for _, loss in e.job(job["id"])["loss_history"]]
    assert got == pytest.approx(expected, rel=1e-4)


def test_requests_during_training_get_the_tokens_they_get_without_training(tmp_path, adapter_dirs):
    plan = [
        ("base", PROMPTS[0]),
        ("alpha", PROMPTS[1]),
        ("base", PROMPTS[2]),
        ("alpha", PROMPTS[3]),
    ]
    expected_tokens = alone_tokens(tmp_path, adapter_dirs, plan)
    expected_losses = alone_losses(tmp_path)
    slo = Slo(ttft=0.001, tpot=0.2)  # first tokens at once, then training between tokens
    with Engine(
        EngineConfig(model="tiny", data_dir=tmp_path / "both", policy="deferred"), thread=False
    ) as e:
        e.load_adapter("alpha", adapter_dirs["alpha"])
        job = e.tune("herb", RECORDS8, **JOB)
        kinds, streams = [], []
        for i in range(10_000):
            if i % 7 == 0 and len(streams) < len(plan):
                adapter, prompt = plan[len(streams)]
                streams.append(e.generate(prompt, adapter=adapter, max_new_tokens=12, slo=slo))
            kinds.append(e.iterate().kind)
            if (
                i % 3 == 0 and e.core.trainer.active
            ):  # and, whatever the clock says, more training in between
                e.core.trainer.micro_step(1 + i % 2)
                kinds.append(IterationKind.TRAIN)
            if (
                len(streams) == len(plan)
                and all(s.final for s in streams)
                and not e.core.trainer.active
            ):
                break
        losses = [loss for _, loss in e.job(job["id"])["loss_history"]]
    assert [s.final["token_ids"] for s in streams] == expected_tokens
    assert losses == pytest.approx(expected_losses, rel=1e-4)
    first, last = (
        kinds.index(IterationKind.PREFILL),
        len(kinds) - 1 - kinds[::-1].index(IterationKind.DECODE),
    )
    assert IterationKind.TRAIN in kinds[first:last]  # they really were interleaved


def test_threaded_engine_serves_while_a_job_trains(tmp_path):
    with Engine(
        EngineConfig(
            model="tiny", data_dir=tmp_path, policy="deferred", slo=Slo(ttft=0.5, tpot=0.2)
        )
    ) as e:
        job = e.tune("herb", RECORDS8, **dict(JOB, max_steps=100_000))
        answers = [e.complete(p, max_new_tokens=8) for p in PROMPTS]
        assert e.job(job["id"])["state"] == "running"  # served before the job ended
        assert all(a.finish_reason in ("length", "eos") for a in answers)
        snap = e.metrics_snapshot()
        assert e.stop_job(job["id"])["state"] == "stopped"
    assert snap["share"]["train"] > 0 and snap["share"]["decode"] > 0
    assert snap["inference"]["slo"]["ttft"] is not None
    assert snap["share"]["prefill"] > 0 and "train" in {t["kind"] for t in snap["timeline"]}
    assert all(
        a.stats["deferred"] >= 0 and a.stats["slack_at_admission"] is not None for a in answers
    )
