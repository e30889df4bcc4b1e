"""Notebook data sources, %fineinfer eval and %fineinfer restart in a real kernel against a real
jupyter_server with the extension (tiny model)."""

import re

import pytest

from fineinfer_jupyter.kernel.render import eval_lines

pytest_plugins = ["kernel_fixtures"]

pytestmark = pytest.mark.timeout(180)

TABLE = (
    "import pandas as pd, datasets\n"
    "df = pd.DataFrame({'question': ['Color of moonveil?', 'Where grows glimmerroot?',"
    " 'When does vesperine bloom?', 'Is ashbloom safe?'] * 2,"
    " 'answer': ['Silver blue.', 'In caves.', 'At dusk.', 'No, it burns.'] * 2})\n"
    "ds = datasets.Dataset.from_pandas(df)\n"
    "df.to_csv('data/table.csv', index=False)\n"
)
COLUMNS = "--prompt-column question --completion-column answer"


@pytest.fixture(scope="module")
def table(kernel):
    kernel.run(TABLE)


@pytest.fixture(scope="module")
def evaluated(kernel, client, table):
    """An adapter trained from a DataFrame with a validation split."""
    run = kernel.run(
        f"%fineinfer tune qa --data df {COLUMNS} --max-steps 8 --lr 0.02 --val-fraction 0.25"
    )
    assert re.match(r"job-\d+: training 'qa' on 6 examples, 8 steps\n", run.stdout), run.stderr
    assert "done · step 8/8" in kernel.run("%fineinfer wait qa --timeout 60").stdout
    return client.find_job("qa")


def test_a_dataframe_a_dataset_and_a_csv_file_train_on_the_same_examples(kernel, client, table):
    runs = {
        "fromdf": f"--data df {COLUMNS}",
        "fromds": f"--records ds {COLUMNS}",
        "fromcsv": f"--data data/table.csv {COLUMNS}",
    }
    jobs = {}
    for name, source in runs.items():
        run = kernel.run(f"%fineinfer tune {name} {source} --max-steps 2 --rank 4")
        assert f"training {name!r} on 8 examples, 2 steps" in run.stdout, run.stderr
        jobs[name] = client.wait(name, timeout=60)
    losses = {name: job["loss_history"] for name, job in jobs.items()}
    assert losses["fromdf"] == losses["fromds"] == losses["fromcsv"]  # same examples, same seed
    assert jobs["fromcsv"]["state"] == "done"


def test_without_a_length_a_small_data_set_trains_several_epochs(kernel, client, table):
    run = kernel.run(f"%fineinfer tune auto --data df {COLUMNS} --batch-size 4 --rank 4")
    first = run.stdout.splitlines()[0]
    # 8 examples, 2 steps an epoch: 15 epochs (MAX_EPOCHS) come before 150 steps (MIN_STEPS)
    assert re.fullmatch(
        r"job-\d+: training 'auto' on 8 examples, 30 steps \(15 epochs: a small data set is "
        r"seen several times; set --epochs or --max-steps\)",
        first,
    )
    job = client.wait("auto", timeout=120)
    assert job["auto_length"] and job["epochs"] == 15 and job["loss_falling"] is not None


def test_eval_prints_the_servers_numbers_base_beside_the_adapter(
    kernel, client, evaluated, server_root
):
    run = kernel.run("%fineinfer eval qa")
    expected = client.evaluate("qa")
    assert run.stdout == "\n".join(eval_lines(expected)) + "\n" and run.stderr == ""
    assert expected["data"] == f"held out by {evaluated['id']}" and expected["examples"] == 2
    assert [m["model"] for m in expected["models"]] == ["qa", "base"]
    assert expected["models"][0]["loss"] == pytest.approx(evaluated["eval_loss"], rel=1e-5)
    lines = run.stdout.splitlines()
    assert lines[1].split() == ["model", "loss", "perplexity", "exact", "match", "contains"]
    assert lines[2].split()[0] == "qa" and lines[3].split()[0] == "base"
    on_file = client.evaluate("qa", server_root / "data/table.csv", columns={"prompt": "question", "completion": "answer"}, compare=[], limit=3)  # fmt: skip
    assert on_file["examples"] == 3 and [m["model"] for m in on_file["models"]] == ["qa"]
    assert on_file["models"][0]["answers"] == 3


@pytest.mark.parametrize(
    "code, message",
    [
        ("%fineinfer tune x --data nothere", "tune: --data: no file or folder and no variable named 'nothere'"),
        ("%fineinfer tune x --records nothere", "tune: --records: no variable named 'nothere'"),
        ("%fineinfer tune x --data df", "unrecognised record (keys: 'question', 'answer'); expected"),
        ("%fineinfer tune x --data df --prompt-column q", "no column 'q' for prompt (columns: 'question', 'answer')"),
        ("n = 3\n%fineinfer tune x --data n", "n is a int; expected a pandas DataFrame"),
        ("%fineinfer tune x --data data/table.csv", "unrecognised record (keys: 'question', 'answer')"),
        ("%fineinfer eval nope", "adapter: no adapter named 'nope'"),
        ("%fineinfer eval fromdf", "'fromdf' has no held-out examples (train with val_fraction"),
        ("%fineinfer eval qa --compare base,base", "eval: --compare takes distinct names"),
        ("%fineinfer eval qa --data data/missing.csv", "missing.csv': no such file"),
    ],
)  # fmt: skip
def test_data_and_eval_errors_print_one_line(kernel, table, evaluated, code, message):
    if "fromdf" in code:
        kernel.run(f"%fineinfer tune fromdf --data df {COLUMNS} --max-steps 1 --rank 4")
    run = kernel.run(code)
    assert run.stderr.startswith("fineinfer: ") and message in run.stderr, run.stderr
    assert run.stderr.count("\n") == 1 and not run.errors and run.stdout == ""


def test_restart_loads_the_model_again_and_keeps_the_adapters(kernel, client, evaluated):
    before = client.status()
    run = kernel.run("%fineinfer restart --timeout 120", timeout=150)
    lines = run.stdout.splitlines()
    assert lines[0] == "restarting the engine: loading the model again…" and run.stderr == ""
    assert re.fullmatch(r"fineinfer [\d.]+ at .*: ready again", lines[1])
    after = client.status()
    assert after["restarts"] == before["restarts"] + 1 and "qa" in after["adapters"]
    assert client.complete("Hi", max_new_tokens=2)["usage"]["completion_tokens"] == 2
