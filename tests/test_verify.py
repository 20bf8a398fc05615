"""RLVR's data plumbing and answer checkers (issue 23): every field of a prompt row reaches reward
functions as a column, aligned with the responses; the math, exact and format checkers on tricky
answers; a missing column is a data error naming the row."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from conftest import COLORS, write_jsonl
from test_ppo import ppo_cfg

from rlhfkit.data.build import load_prompts
from rlhfkit.data.readers import DataError
from rlhfkit.rewards import verify
from rlhfkit.rewards.http import RewardClient
from rlhfkit.rollout.collect import PromptStream, ScoreNormalizer, collect
from rlhfkit.rollout.columns import columns_for, required_columns
from rlhfkit.rollout.rewards import call_reward_fn
from rlhfkit.stages.ppo import load_models, run_ppo

# --------------------------------------------------------------------------- the math checker


@pytest.mark.parametrize(
    "response, gold, score",
    [
        ("so x = \\boxed{\\frac{1}{2}}", "0.5", 1.0),  # equivalent forms
        ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
        ("\\boxed{\\dfrac{3}{4}}", "3/4", 1.0),
        ("\\boxed{1,000}", "1000", 1.0),
        ("she has 1,000 apples", "1000", 1.0),  # no box: the last number
        ("first 7 then 12", "12", 1.0),
        ("first 12 then 7", "12", 0.0),
        ("\\boxed{3} no wait \\boxed{5}", "5", 1.0),  # several boxes: the last one counts
        ("\\boxed{5} no wait \\boxed{3}", "5", 0.0),
        ("\\boxed{4}", "5", 0.0),
        ("\\boxed{-2}", "-2", 1.0),
    ],
)
def test_math_checker_on_equivalent_forms_and_several_boxes(response, gold, score):
    verify.pop_metrics()
    assert verify.math(["q"], [response], [gold]) == [score]
    assert verify.pop_metrics() == {"reward/unparsed": 0.0}  # read, right or wrong


# math-verify's own regression table (tests/test_all.py of huggingface/Math-Verify: number
# extraction, fractions, LaTeX notation, percent), run through our checker with the gold as the
# row's ``answer``: math-verify's parse/verify grade every row as given here. Left out: golds
# written with a decimal comma ("1,22", "0,111"): a bare gold is read as boxed, where a comma
# separates thousands or list items (docs/rewards.md).
MATH_VERIFY_TABLE = [
    ("-5", "-5", 1),
    ("7425000", "7,425,000", 1),
    ("1000", "1 000", 1),
    ("1000", "1000.0", 1),
    ("1000.0", "1,000.0", 1),
    ("2.74", "Soucis : 2,74 $ a..", 1),
    ("0.4", ".4", 1),
    ("1000.99", "1,000.99", 1),
    ("1000.99", "$1,000.99", 1),
    ("1000.99", "1,000.99$", 1),
    ("1000.99", "the number is not 10 which is 1,000.99€", 1),
    ("1000.99", "so the number is 10 which is 1,000.99m²", 1),
    ("1000.99", "not it's not 10 it's 1,000.99m²", 1),
    ("2", "AZYUK2A", 0),
    ("10/9", "\\frac{10}{9}", 1),
    ("-10/9", "-\\frac{10}{9}", 1),
    ("$[0,1)$", "$[0,1)$", 1),
    ("$[0,9)$", "$[0,1)$", 0),
    ("$(0,9)$", "$[0,9)$", 0),
    ("$9$", "Answer \\[ 9 \\]", 1),
    ("$9$", "Answer $ 9 $", 1),
    ("$9$", "Answer $$ 9 $$", 1),
    ("$9$", "Answer \\( 9 \\)", 1),
    ("$10$", "Answer \\( (9+1) \\)", 1),
    ("$10/9$", "Answer $ \\frac{1}{2} \\$ = \\frac{10}{9} $", 1),
    ("$1/3$", "$\\frac13 $", 1),
    ("$\\sqrt{3}$", "$\\sqrt3 $", 1),
    ("$1/3$", "$\\dfrac{1}{3} $", 1),
    ("$1/3$", "$\\tfrac{1}{3} $", 1),
    ("$1/3$", "$\\left( \\frac{1}{3} \\right)$", 1),
    ("$1/3$", "$\\frac{1}{3} \\text{meters}$", 1),
    ("$1/3$", "$k = \\frac{1}{3}$", 1),
    ("$28\\%$", "28 percent", 1),
    ("$28\\%$", "28 %", 1),
    ("$28\\%$", "$28$ percent", 1),
    ("$28\\%$", "28", 1),
    ("$0.28$", "28", 0),
    ("$28$", "28/100", 0),
    ("$\\frac{28}{100}$", "28", 0),
]


@pytest.mark.parametrize("gold, response, score", MATH_VERIFY_TABLE)
def test_math_checker_grades_math_verifys_regression_table(gold, response, score):
    """Issue 36: our own extraction (last box, else the last number) ran before math-verify and
    agreed with this table on about 26 of 37 rows; math-verify now reads unboxed answers."""
    assert verify.math(["q"], [response], [gold]) == [float(score)]


# How small models end their answers, each graded as a person would grade it (issue 36).
SMALL_MODEL_ENDINGS = [
    ("The answer is 12, which is even.", "12", 1),  # the comma is not part of the number
    ("So the answer is 12.", "12", 1),
    ("So the answer is 12!", "12", 1),
    ("She pays $12.", "12", 1),  # currency
    ("It costs $1,234.50 in all.", "1234.5", 1),  # thousands separator, cents
    ("The rope is 12 cm long.", "12", 1),  # units
    ("In total 7,425,000 people.", "7425000", 1),
    ("The discount is 25%.", "25", 1),  # percent, gold without the sign
    ("#### 42", "42", 1),  # GSM8K's marker
    ("The answer is **42**.", "42", 1),  # bold
    ("3 + 4 = 7", "7", 1),  # several numbers: the last is the answer
    ("He had 5 apples and ate 2, so 3 are left.", "3", 1),
    ("He had 5 apples and ate 2, so 3 are left.", "5", 0),
    ("first 12 then 7", "12", 0),
    ("The answer is -3.", "-3", 1),
    ("x = \\frac{1}{2}", "0.5", 1),  # unboxed LaTeX
    ("so \\boxed{7}. Then I checked: 7 * 2 = 14.", "7", 1),  # the box is the answer
    ("\\boxed{3} no wait \\boxed{5}", "5", 1),  # several boxes: the last one counts
    ("\\boxed{5} no wait \\boxed{3}", "5", 0),
    ("the answer is \\boxed{N}", "5", 0),  # a placeholder is a wrong answer
    # the question restated is not its answer, though math-verify evaluates it (SmolLM2 wrote
    # these, and GRPO rewarded them: docs/real-models.md)
    ("2 + 3 is a simple arithmetic operation that simply adds two to three.", "5", 0),
    ("The answer: 2 + 7 is only 11.", "9", 0),
    ("The answer is 2+7.", "9", 0),
    ("The answer is \\boxed{4 \\times 5}.", "20", 0),
    ("2 + 7 = 9", "9", 1),  # the operation, then its value
    ("The product is \\boxed{20}.", "20", 1),
]


@pytest.mark.parametrize("response, gold, score", SMALL_MODEL_ENDINGS)
def test_math_checker_grades_small_model_endings_as_a_person_would(response, gold, score):
    assert verify.math(["q"], [response], [gold]) == [float(score)]


def test_exact_checker_reads_the_last_number_without_its_trailing_comma():
    """Issue 36: the old last-number pattern kept the comma of "12," and scored it 0; a digit glued
    to a word is no number."""
    texts = ["The answer is 12, which is even.", "it is 1,000", "AZYUK2A", "about 3,5 or 4"]
    assert verify.exact(["q"] * 4, texts, ["12", "1000", "2", "4"]) == [1.0, 1.0, 0.0, 1.0]


def test_checkers_score_an_episodes_final_turn_not_its_tool_outputs():
    """With an environment the trajectory holds tool outputs; the checkers read the model's final
    turn (the ``final_response`` column), where the answer is."""
    trajectory = ['<tool_call>{"name": "add"}</tool_call>', "tool: 12", "I could not add them."]
    whole, final = [" ".join(trajectory)], [trajectory[-1]]
    assert verify.math(["q"], whole, ["12"]) == [1.0]  # the tool's number, read as the answer
    assert verify.math(["q"], whole, ["12"], final_response=final) == [0.0]
    assert verify.exact(["q"], whole, ["12"], final_response=["The sum is 12."]) == [1.0]
    boxed = ["\\boxed{11}"]
    assert verify.format(["q"], whole, final_response=boxed) == [verify.FORMAT_WEIGHT]


def test_math_checker_scores_unreadable_answers_zero_and_counts_them():
    verify.pop_metrics()
    long = "\\boxed{" + "9" * (verify.MAX_ANSWER_CHARS + 1) + "}"
    responses = ["no answer at all", long, "\\boxed{3", "\\boxed{}", "\\boxed{7}"]
    scores = verify.math(["q"] * 5, responses, ["9", "9" * 101, "3", "1", "7"])
    assert scores == [0.0, 0.0, 0.0, 0.0, 1.0]
    assert verify.pop_metrics() == {"reward/unparsed": pytest.approx(4 / 5)}
    assert verify.pop_metrics() == {}  # popped


def test_math_checker_runs_outside_the_main_thread():
    """math-verify's own timeouts need SIGALRM (main thread only); a reward server scores in a
    thread pool, where the checker turns them off."""
    out = {}
    t = threading.Thread(target=lambda: out.update(s=verify.math(["q"], ["\\boxed{2}"], ["2"])))
    t.start()
    t.join()
    assert out["s"] == [1.0]


def test_exact_and_format_checkers():
    assert verify.exact(
        ["q"] * 3, ["\\boxed{Paris}", "paris", "it is 1,000"], ["Paris"] * 2 + ["1000"]
    ) == [1.0, 0.0, 1.0]
    w = verify.FORMAT_WEIGHT
    texts = ["so \\boxed{4}.", "\\boxed{4} and then more words", "\\boxed{1} \\boxed{2}", "4"]
    texts += ["the answer is \\boxed{N}.", "\\boxed{}", "\\boxed{\\frac{x}{y}}"]
    # a placeholder is no answer: the fixed reward hack of docs/rlvr.md
    assert verify.format(["q"] * 7, texts) == [w, 0.0, 0.0, 0.0, 0.0, 0.0, w]


# --------------------------------------------------------------------------- columns


def test_columns_reach_functions_that_name_them_and_two_argument_ones_keep_working():
    cols = {"answer": ["1", "2"], "task": ["a", "b"]}
    seen = {}

    def named(prompts, responses, answer):
        seen["named"] = answer
        return [0.0, 0.0]

    def every(prompts, responses, **kw):
        seen["every"] = kw
        return [0.0, 0.0]

    def old(prompts, responses):
        return [1.0, 2.0]

    for fn in (named, every, old):
        call_reward_fn(fn, ["p", "q"], ["r", "s"], cols)
    assert seen == {"named": ["1", "2"], "every": cols}
    assert call_reward_fn(old, ["p", "q"], ["r", "s"], cols).tolist() == [1.0, 2.0]
    assert columns_for(old, cols) == {} and required_columns(old) == ()
    assert required_columns(named) == ("answer",) and required_columns(every) == ()
    assert required_columns(verify.math) == ("answer",)


def _answer_rows(tmp_path):
    rows = [{"prompt": f"say {c} :", "answer": str(i), "task": c} for i, c in enumerate(COLORS)]
    return write_jsonl(tmp_path / "answers.jsonl", rows)


def test_each_response_gets_its_own_rows_columns_in_the_rollout(tmp_path, tiny_lm):
    """The rollout shuffles prompts and repeats each n times: every response must still get the
    answer of the row its prompt came from (the reward returns it as the score)."""

    def answer_as_score(prompts, responses, answer, task):
        assert all(p == f"say {t} :" for p, t in zip(prompts, task, strict=True))
        return [float(a) for a in answer]

    cfg = ppo_cfg(
        tmp_path,
        tiny_lm,
        f"data.train_file={_answer_rows(tmp_path)}",
        "rollout.samples_per_prompt=4",
        "ppo.estimator=grpo",
    )
    torch.manual_seed(0)
    models = load_models(cfg, None, answer_as_score)
    prompts, _ = load_prompts(cfg.data.train_file, models.tokenizer, cfg.data)
    exp, _ = collect(
        models, prompts, PromptStream(len(prompts), 0), cfg, ScoreNormalizer("none", None, 0)
    )
    tok = models.tokenizer
    for ids, m, score in zip(exp.prompt_ids, exp.prompt_mask, exp.raw_scores, strict=True):
        color = tok.decode(ids[m.bool()], skip_special_tokens=True).split()[1]
        assert score == COLORS.index(color)
    for g in exp.group.unique():  # a group shares one prompt, so one answer
        assert exp.raw_scores[exp.group == g].unique().numel() == 1


def test_a_row_without_the_column_a_checker_needs_names_file_line_and_column(tmp_path, tiny_lm):
    rows = [{"prompt": f"say {c} :", "answer": "1"} for c in COLORS]
    del rows[2]["answer"]
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    cfg = ppo_cfg(
        tmp_path, tiny_lm, f"data.train_file={data}", "reward_fn=rlhfkit.rewards.verify:math"
    )
    with pytest.raises(DataError, match=r"p\.jsonl:3: column 'answer': missing; reward_fn needs"):
        run_ppo(cfg)
    assert not (tmp_path / "ppo" / "checkpoints").exists()  # before any work


def test_the_http_protocol_carries_the_columns(tmp_path):
    """A reward server on 127.0.0.1 that scores by the optional "columns" field: the client sends
    each batch's slice of them."""
    bodies = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            bodies.append(body)
            scores = [float(a) for a in body.get("columns", {}).get("answer", [])]
            data = json.dumps({"scores": scores}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = RewardClient(
            f"http://127.0.0.1:{server.server_address[1]}/score", batch_size=2, timeout=5
        )
        answers = ["3", "1", "4", "1", "5"]
        scores = client.score(["p"] * 5, ["r"] * 5, {"answer": answers})
    finally:
        server.shutdown()
    assert scores == [3.0, 1.0, 4.0, 1.0, 5.0]
    assert sorted(len(b["columns"]["answer"]) for b in bodies) == [1, 2, 2]
