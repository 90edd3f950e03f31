"""Prompt files and rows: finding files, up-front file checks, stable ids, row validation, the shipped prompts."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tiny import make_tokenizer

from vocabtrim.errors import UserError
from vocabtrim.prompts import (
    check_prompt_file,
    encode_prompt,
    find_prompt_files,
    inspect_prompt_files,
    read_chunks,
    stable_id,
)

DATA = Path(__file__).resolve().parent.parent / "vocabtrim" / "data"


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def write(path: Path, **columns) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def test_files_folders_and_globs(tmp_path):
    a = write(tmp_path / "d" / "a.parquet", prompt=["x"])
    b = write(tmp_path / "d" / "sub" / "b.parquet", prompt=["y"])
    write(tmp_path / "d" / ".hidden" / "h.parquet", prompt=["z"])
    write(tmp_path / "d" / "_tmp.parquet", prompt=["z"])
    c = write(tmp_path / "c.parquet", prompt=["w"])

    a, b, c = str(a), str(b), str(c)  # locations are strings, local ones spelled as found
    assert find_prompt_files([str(tmp_path / "d")]) == [(a, "a.parquet"), (b, "sub/b.parquet")]
    assert find_prompt_files([c]) == [(c, "c.parquet")]
    assert find_prompt_files([str(tmp_path / "d" / "[ab].parquet")]) == [(a, "a.parquet")]
    (tmp_path / "d" / "_SUCCESS").write_text("")  # a Spark job's marker beside its parts: no input, also through a glob
    delta = str(write(tmp_path / "d" / "_delta_log" / "00010.checkpoint.parquet", add=["x"]))
    assert find_prompt_files([str(tmp_path / "d" / "*")]) == [(a, "a.parquet"), (b, "b.parquet")]  # _tmp.parquet skipped
    assert find_prompt_files([str(tmp_path / "d" / "**" / "*.parquet")]) == [(a, "a.parquet"), (b, "b.parquet")]
    assert find_prompt_files([str(tmp_path / "d" / "_delta_log" / "*")]) == [(delta, "00010.checkpoint.parquet")]  # named
    literal = str(write(tmp_path / "p[1].parquet", prompt=["v"]))  # a name with [ that exists is that file
    assert find_prompt_files([literal]) == [(literal, "p[1].parquet")]
    assert find_prompt_files([str(tmp_path / "d" / "**" / "b.parquet")]) == [(b, "b.parquet")]
    # the same file named twice counts once (also through another spelling: file://)
    assert find_prompt_files([c, str(tmp_path / "c*.parquet"), f"file://{c}"]) == [(c, "c.parquet")]


def test_missing_inputs_and_name_clashes_are_refused(tmp_path):
    with pytest.raises(UserError, match="no such prompt file"):
        find_prompt_files([str(tmp_path / "nope.parquet")])
    with pytest.raises(UserError, match="matches no files"):
        find_prompt_files([str(tmp_path / "*.parquet")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no .parquet"):
        find_prompt_files([str(tmp_path / "empty")])
    a1 = write(tmp_path / "x" / "a.parquet", prompt=["1"])
    a2 = write(tmp_path / "y" / "a.parquet", prompt=["2"])
    with pytest.raises(UserError, match="would both write a.parquet"):
        find_prompt_files([str(a1), str(a2)])


def test_bad_files_refused_in_one_line(tmp_path):
    text = tmp_path / "notes.parquet"
    text.write_text("this is not parquet\n")
    with pytest.raises(UserError, match="not a readable Parquet file") as e:
        check_prompt_file(str(text), "notes.parquet", "prompt", "id")
    assert "\n" not in str(e.value)
    f = write(tmp_path / "f.parquet", text=["hello"])
    with pytest.raises(UserError, match=r"no prompt column 'prompt' \(columns: text\)"):
        inspect_prompt_files([str(f)], "prompt", "id")


def test_an_id_column_of_lists_is_refused_in_one_line(tmp_path):
    f = write(tmp_path / "f.parquet", prompt=["a", "b"], id=[[1], [2]])
    with pytest.raises(UserError, match="ids must be strings or integers") as e:
        inspect_prompt_files([str(f)], "prompt", "id")
    assert "\n" not in str(e.value)


MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])


@pytest.mark.parametrize("values, shown, why", [
    (pa.array([1, 2]), "int64", "prompts must be strings or lists of {role, content} messages"),
    (pa.array([1.5, None]), "double", "prompts must be strings or lists of {role, content} messages"),
    (pa.array([b"a", b"b"]), "binary", "prompts must be strings or lists of {role, content} messages"),
    (pa.array([["a"], ["b"]]), "list<element: string>", "its lists hold string, not {role, content} structs"),
    (pa.array([[{"role": "user", "text": "a"}]]), "list<element: struct<role: string, text: string>>",
     "its messages have no 'content' field"),
    (pa.array([[{"role": "user", "content": 7}]]), "list<element: struct<role: string, content: int64>>",
     "its messages' 'content' field holds int64, not strings"),
])
def test_a_prompt_column_of_another_type_is_refused_in_one_line(tmp_path, values, shown, why):
    """A prompt column whose Arrow type holds no prompt in any row is a bad file, as a corpus column that is not
    text is: one line naming the file, the column and the type, not an error row for every row."""
    f = write(tmp_path / "f.parquet", prompt=values)
    with pytest.raises(UserError) as e:
        inspect_prompt_files([str(f)], "prompt", "id")
    assert str(e.value) == f"{f}: --prompt-column 'prompt' holds {shown} values: " + (
        why if why.startswith("prompts") else f"prompts must be strings or lists of {{role, content}} messages ({why})")


@pytest.mark.parametrize("values", [
    pa.array(["a", None]),
    pa.array(["a", "b"], pa.large_string()),
    pa.array(["a", "b", "a"]).dictionary_encode(),
    pa.array([None, None], pa.null()),
    pa.array([[{"role": "user", "content": "hi"}], None], pa.list_(MESSAGE)),
    pa.array([[{"role": "user", "content": "hi", "name": "x"}]]),
    pa.array([[{"role": "user", "content": "hi"}]], pa.large_list(MESSAGE)),
])
def test_prompt_columns_of_strings_messages_or_nulls_are_taken(tmp_path, values):
    f = write(tmp_path / "f.parquet", prompt=values)
    assert inspect_prompt_files([str(f)], "prompt", "id")[0].prompt_type == values.type


def test_an_id_in_two_rows_is_refused_before_any_work(tmp_path, tiny_pair_dirs, capsys):
    """Two rows with one --id-column value would share a seed and an output identity: the file is refused in
    one line (exit 2) before a model is loaded or --out is made. Null ids (stable ids instead) and one id in
    two different files are fine."""
    from vocabtrim import cli

    twice = write(tmp_path / "twice.parquet", id=["a", "b", "a", None, None], prompt=["x", "y", "z", "u", "v"])
    with pytest.raises(UserError, match=r"twice.parquet: --id-column 'id' holds 'a' in 2 rows: ids must be unique"):
        inspect_prompt_files([str(twice)], "prompt", "id")
    other = write(tmp_path / "ok" / "one.parquet", id=[1, 2, None, None], prompt=["x", "y", "z", "w"])
    write(tmp_path / "ok" / "two.parquet", id=[1, 2], prompt=["x", "y"])
    assert [f.num_rows for f in inspect_prompt_files([str(tmp_path / "ok")], "prompt", "id")] == [4, 2]
    assert inspect_prompt_files([str(twice)], "prompt", "key")[0].id_type is None  # no such column: stable ids

    target, drafter = tiny_pair_dirs
    out = tmp_path / "out"
    argv = ["generate", "--target", target, "--drafter", drafter, "--prompts", str(other), str(twice),
            "--no-progress", "--out", str(out)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "holds 'a' in 2 rows" in err
    assert not out.exists()


def test_file_facts(tmp_path):
    f = write(tmp_path / "f.parquet", id=pa.array([7, 8, 9], pa.int64()), prompt=["a", "b", "c"])
    info = check_prompt_file(str(f), "f.parquet", "prompt", "id")
    assert info.path == str(f)
    assert (info.num_rows, info.id_type, info.prompt_type) == (3, pa.int64(), pa.string())
    assert check_prompt_file(str(f), "f.parquet", "prompt", "other").id_type is None


def test_chunks_cover_every_row_once_with_stable_ids(tmp_path):
    f = tmp_path / "f.parquet"
    pq.write_table(pa.table({"prompt": [f"p{i}" for i in range(10)]}), f, row_group_size=3)
    info = check_prompt_file(str(f), "sub/f.parquet", "prompt", "id")
    chunks = list(read_chunks(info, "prompt", "id", rows_per_chunk=4))
    assert [c.start for c in chunks] == sorted(c.start for c in chunks)
    assert sum(len(c.prompts) for c in chunks) == 10
    keys = [k for c in chunks for k in c.keys]
    assert keys == [stable_id("sub/f.parquet", i) for i in range(10)] == [f"sub/f.parquet:{i}" for i in range(10)]
    assert [v for c in chunks for v in c.ids.to_pylist()] == keys
    assert [p for c in chunks for p in c.prompts] == [f"p{i}" for i in range(10)]


def test_a_dropped_connection_while_reading_rows_is_retried_from_the_next_row(tmp_path, monkeypatch):
    """A fault of the machine mid-file reopens it at the first row not yet yielded (here inside a row group):
    every row once, in order; a fault on every try keeps its type (not the user's file) after READ_ATTEMPTS tries."""
    from vocabtrim import prompts

    f = tmp_path / "f.parquet"
    pq.write_table(pa.table({"prompt": [f"p{i}" for i in range(10)]}), f, row_group_size=3)
    info = check_prompt_file(str(f), "f.parquet", "prompt", None)
    real, opened = prompts._chunks_from, []

    def dropping(after):
        def chunks(*args):
            opened.append(args[-1])
            for n, chunk in enumerate(real(*args)):
                if n == after and len(opened) == 1:
                    raise OSError("AWS Error NETWORK_CONNECTION during GetObject operation: connection reset by peer")
                yield chunk
        return chunks

    monkeypatch.setattr(prompts, "_chunks_from", dropping(after=2))
    chunks = list(read_chunks(info, "prompt", None, rows_per_chunk=4))
    assert opened == [0, 8]  # reopened at row 8: the middle of the row group of rows 6-8
    assert [p for c in chunks for p in c.prompts] == [f"p{i}" for i in range(10)]
    assert [k for c in chunks for k in c.keys] == [stable_id("f.parquet", i) for i in range(10)]
    assert [c.start for c in chunks] == [0, 4, 8]

    def always(*args):
        opened.append(args[-1])
        raise OSError("AWS Error NETWORK_CONNECTION during GetObject operation: connection reset by peer")
        yield

    opened.clear()
    monkeypatch.setattr(prompts, "_chunks_from", always)
    with pytest.raises(OSError, match="connection reset") as raised:
        list(read_chunks(info, "prompt", None, rows_per_chunk=4))
    assert not isinstance(raised.value, UserError) and len(opened) == prompts.READ_ATTEMPTS


def test_a_prompt_that_is_not_utf8_is_an_error_row_and_the_others_are_read(tmp_path, tok):
    """Writers other than pyarrow may store any bytes in a string column: such a row (a string, or a message's
    content) gets its reason, as any bad row does, and the rows around it are read."""
    from vocabtrim.prompts import Undecodable

    f = tmp_path / "f.parquet"
    pq.write_table(pa.table({"prompt": pa.array([b"ok", b"caf\xe9", b"fine"], pa.binary()).view(pa.string())}), f)
    (chunk,) = read_chunks(check_prompt_file(str(f), "f.parquet", "prompt", None), "prompt", None, 10)
    assert chunk.prompts[0] == "ok" and chunk.prompts[2] == "fine" and isinstance(chunk.prompts[1], Undecodable)
    ids, problem = encode_prompt(chunk.prompts[1], tok, 100)
    assert ids is None and problem.startswith("prompt is not valid UTF-8 ('utf-8' codec can't decode byte 0xe9 in position 3")
    content = pa.array([b"hi", b"caf\xe9"], pa.binary()).view(pa.string())
    messages = pa.ListArray.from_arrays([0, 1, 2], pa.StructArray.from_arrays([pa.array(["user", "user"]), content], ["role", "content"]))
    pq.write_table(pa.table({"prompt": messages}), f)
    (chunk,) = read_chunks(check_prompt_file(str(f), "f.parquet", "prompt", None), "prompt", None, 10)
    assert chunk.prompts[0] == [{"role": "user", "content": "hi"}] and isinstance(chunk.prompts[1], Undecodable)


def test_an_id_that_is_not_utf8_is_refused_in_one_line_before_any_work(tmp_path):
    """Ids name their output rows: one that is not valid UTF-8 refuses its file up front (a prompt that is not is an
    error row), not when the run reaches the file."""
    f = tmp_path / "f.parquet"
    pq.write_table(pa.table({"id": pa.array([b"a", b"caf\xe9"], pa.binary()).view(pa.string()), "prompt": ["x", "y"]}), f)
    with pytest.raises(UserError, match=r"f\.parquet: --id-column 'id' holds a value that is not valid UTF-8 \(.*Invalid UTF8"):
        check_prompt_file(str(f), "f.parquet", "prompt", "id")


def test_two_columns_of_one_name_are_refused_in_one_line(tmp_path):
    f = tmp_path / "f.parquet"
    pq.write_table(pa.Table.from_arrays([pa.array(["a"]), pa.array(["b"])], names=["prompt", "prompt"]), f)
    with pytest.raises(UserError, match=r"f\.parquet has 2 columns named 'prompt': one is read, so name them apart"):
        check_prompt_file(str(f), "f.parquet", "prompt", None)


def test_id_column_is_carried_and_null_ids_get_stable_keys(tmp_path):
    f = write(tmp_path / "f.parquet", id=pa.array([10, None, 12], pa.int64()), prompt=["a", "b", "c"])
    info = check_prompt_file(str(f), "f.parquet", "prompt", "id")
    (chunk,) = read_chunks(info, "prompt", "id", rows_per_chunk=100)
    assert chunk.ids.type == pa.int64() and chunk.ids.to_pylist() == [10, None, 12]
    assert chunk.keys == ["10", "f.parquet:1", "12"]


def test_string_view_and_all_null_id_columns_are_ids(tmp_path):
    """Polars writes string columns as string_view, pandas an all-None column as Arrow's null type: ids like any
    other (a repeated view refused as a repeated string is), and null ids are stable ids."""
    f = write(tmp_path / "f.parquet", id=pa.array(["a", None, "c"]).cast(pa.string_view()), prompt=["x", "y", "z"])
    (chunk,) = read_chunks(check_prompt_file(str(f), "f.parquet", "prompt", "id"), "prompt", "id", rows_per_chunk=100)
    assert chunk.keys == ["a", "f.parquet:1", "c"]
    g = write(tmp_path / "g.parquet", id=pa.array([None, None], pa.null()), prompt=["x", "y"])
    (chunk,) = read_chunks(check_prompt_file(str(g), "g.parquet", "prompt", "id"), "prompt", "id", rows_per_chunk=100)
    assert chunk.keys == ["g.parquet:0", "g.parquet:1"]
    twice = write(tmp_path / "twice.parquet", id=pa.array(["a", "a"]).cast(pa.string_view()), prompt=["x", "y"])
    with pytest.raises(UserError, match="--id-column 'id' holds 'a' in 2 rows"):
        check_prompt_file(str(twice), "twice.parquet", "prompt", "id")


# ---------------------------------------------------------------------------------------------
# Object storage (a local S3 server: the `s3` fixture in conftest)
# ---------------------------------------------------------------------------------------------


def put(where: str, **columns) -> str:
    from vocabtrim import storage

    storage.write_with(where, lambda tmp: pq.write_table(pa.table(columns), tmp))
    return where


def test_s3_folders_and_globs(s3):
    bucket = s3.bucket()
    a = put(f"{bucket}/d/a.parquet", prompt=["x"])
    b = put(f"{bucket}/d/sub/b.parquet", prompt=["y"])
    put(f"{bucket}/d/.hidden/h.parquet", prompt=["z"])
    put(f"{bucket}/d/_tmp.parquet", prompt=["z"])
    put(f"{bucket}/d/sub/notes.txt", prompt=["z"])
    c = put(f"{bucket}/c.parquet", prompt=["w"])

    # a folder: recursive, hidden entries and other extensions skipped, names relative to the folder
    assert find_prompt_files([f"{bucket}/d"]) == find_prompt_files([f"{bucket}/d/"]) == [(a, "a.parquet"), (b, "sub/b.parquet")]
    assert find_prompt_files([c]) == [(c, "c.parquet")]
    assert find_prompt_files([f"{bucket}/d/[ab].parquet"]) == [(a, "a.parquet")]
    assert find_prompt_files([f"{bucket}/d/**/b.parquet"]) == [(b, "b.parquet")]
    assert find_prompt_files([f"{bucket}/d/su*"]) == [(f"{bucket}/d/sub/b.parquet", "b.parquet")]  # a folder matched
    # the same object named twice counts once, whatever the query
    host = s3.endpoint.split("://", 1)[1]
    with_query = f"{c}?endpoint_override={host}&scheme=http"
    assert find_prompt_files([c, f"{bucket}/c*.parquet", with_query]) == [(c, "c.parquet")]
    # a URI's query configures the filesystem and stays on the locations found through it
    assert find_prompt_files([f"{bucket}/d/a.parquet?endpoint_override={host}&scheme=http"]) == [
        (f"{a}?endpoint_override={host}&scheme=http", "a.parquet")
    ]
    with pytest.raises(UserError, match="would both write b.parquet"):
        find_prompt_files([b, put(f"{bucket}/e/b.parquet", prompt=["v"])])


def test_s3_missing_inputs_are_refused_in_one_line(s3):
    bucket = s3.bucket()
    for args, message in [
        ([f"{bucket}/nope.parquet"], f"no such prompt file or folder: {bucket}/nope.parquet"),
        ([f"{bucket}/*.parquet"], r"\*\.parquet matches no files"),
        (["s3://vt-no-such-bucket/p.parquet"], "no such prompt file or folder"),
        (["nosuchscheme://bucket/p.parquet"], "cannot open nosuchscheme://bucket/p.parquet"),
        ([f"{bucket}/p.parquet?endpoint_override=10.9.8.7:1&bogus=1"], f"cannot open {bucket}/p.parquet: .*'bogus'"),
    ]:
        with pytest.raises(UserError, match=message) as e:
            find_prompt_files(args)
        assert "\n" not in str(e.value) and "endpoint_override" not in str(e.value), str(e.value)


def test_s3_file_facts_and_chunks(s3):
    bucket = s3.bucket()
    f = f"{bucket}/in/f.parquet"
    from vocabtrim import storage

    table = pa.table({"id": pa.array(range(10), pa.int64()), "prompt": [f"p{i}" for i in range(10)]})
    storage.write_with(f, lambda tmp: pq.write_table(table, tmp, row_group_size=3))
    ((path, name),) = find_prompt_files([f"{bucket}/in"])
    info = check_prompt_file(path, name, "prompt", "id")
    assert (info.path, info.name, info.num_rows, info.id_type) == (f, "f.parquet", 10, pa.int64())
    chunks = list(read_chunks(info, "prompt", "id", rows_per_chunk=4))
    assert [p for c in chunks for p in c.prompts] == [f"p{i}" for i in range(10)]
    assert [k for c in chunks for k in c.keys] == [str(i) for i in range(10)]
    storage.write_bytes(f"{bucket}/in/notes.parquet", b"not parquet")
    with pytest.raises(UserError, match=f"{bucket}/in/notes.parquet is not a readable Parquet file") as e:
        inspect_prompt_files([f"{bucket}/in/notes.parquet"], "prompt", "id")
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, message",
    [
        (None, "prompt is null"),
        ("", "prompt is empty"),
        ("   \n", "prompt is empty"),
        (42, "got int"),
        ({"role": "user", "content": "hi"}, "got dict"),
        (b"bytes", "got bytes"),
        ([], "empty message list"),
        (["hello"], "message 1 is a str"),
        ([{"content": "hi"}], "message 1 has no role"),
        ([{"role": "user", "content": "a"}, {"role": "assistant"}], "message 2 has no content"),
        ([{"role": "user", "content": 5}], "message 1 has a int content"),
        ([{"role": "user", "content": "  "}], "every message has empty content"),
    ],
)
def test_bad_rows_get_a_reason(tok, value, message):
    ids, problem = encode_prompt(value, tok, 200)
    assert ids is None and message in problem and "\n" not in problem


def test_strings_are_tokenized_as_they_are(tok):
    ids, problem = encode_prompt("the quick brown fox", tok, 200)
    assert problem is None and ids == tok("the quick brown fox")["input_ids"]


def test_messages_get_the_chat_template_with_generation_prompt(tok):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids, problem = encode_prompt(messages, tok, 200)
    assert problem is None
    assert ids == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")


def test_other_fields_of_a_message_reach_the_chat_template(tok):
    """A message's fields beside role and content (a speaker's name, a tool call's id) go to the chat template, which
    may render them; the nulls an Arrow struct gives a message without such a field are left out."""
    import copy

    named = copy.deepcopy(tok)
    named.chat_template = ("{% for m in messages %}{{ m['role'] }}{% if m.name is defined %}({{ m.name }}){% endif %}: "
                           "{{ m['content'] }}\n{% endfor %}")
    rows = pa.array([[{"role": "system", "content": "Be brief.", "name": None},
                      {"role": "user", "content": "hi", "name": "ada"}, {"role": "user", "content": "yo", "name": ""}]],
                    pa.list_(pa.struct([("role", pa.string()), ("content", pa.string()), ("name", pa.string())])))
    ids, problem = encode_prompt(rows.to_pylist()[0], named, 200)
    assert problem is None and named.decode(ids) == "system: Be brief.\nuser(ada): hi\nuser: yo\n"


def test_too_long_for_the_context(tok):
    text = "the quick brown fox " * 20
    n = len(tok(text)["input_ids"])
    assert encode_prompt(text, tok, n)[1] is None
    ids, problem = encode_prompt(text, tok, n - 1)
    assert ids is None and f"prompt has {n} tokens" in problem


def test_a_fault_of_the_machine_in_the_chat_template_is_no_error_row(tok, monkeypatch):
    """A template that rejects the messages gives the row an error; memory running out while it renders is
    raised (the chunk is retried), never written as the row's error."""
    messages = [{"role": "user", "content": "hi"}]

    def fails(error):
        def render(*args, **kwargs):
            raise error
        return render

    monkeypatch.setattr(tok, "apply_chat_template", fails(ValueError("unsupported role")))
    assert encode_prompt(messages, tok, 100) == (None, "the chat template rejects these messages: unsupported role")
    monkeypatch.setattr(tok, "apply_chat_template", fails(MemoryError()))
    with pytest.raises(MemoryError):
        encode_prompt(messages, tok, 100)


def test_messages_without_a_chat_template(tmp_path):
    bare = make_tokenizer()
    bare.chat_template = None
    ids, problem = encode_prompt([{"role": "user", "content": "hi"}], bare, 100)
    assert ids is None and "no chat template" in problem


# ---------------------------------------------------------------------------------------------
# The prompts that ship with the package
# ---------------------------------------------------------------------------------------------


def test_shipped_prompts_are_varied_valid_and_reproducible(tok, tmp_path):
    import importlib.util

    table = pq.read_table(DATA / "prompts.parquet")
    assert table.num_rows >= 300
    rows = table.to_pylist()
    assert len({r["id"] for r in rows}) == len(rows)
    kinds = {r["kind"] for r in rows}
    assert kinds == {"instruction", "question", "code", "chat"}
    assert any(len(r["messages"]) > 2 for r in rows if r["kind"] == "chat")
    for r in rows:
        assert encode_prompt(r["prompt"], tok, 10_000)[1] is None
        assert encode_prompt(r["messages"], tok, 10_000)[1] is None
        assert r["prompt"] == r["messages"][-1]["content"]

    spec = importlib.util.spec_from_file_location("make_prompts", DATA / "make_prompts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write(tmp_path / "again.parquet")
    assert pq.read_table(tmp_path / "again.parquet").equals(table)


def test_damaged_data_pages_are_refused_in_one_line_where_they_are_read(tmp_path):
    """A file whose footer reads but whose prompt column's pages are damaged passes the footer checks; reading
    its rows then refuses it in one line (a UserError), not with pyarrow's traceback."""

    path = tmp_path / "p.parquet"
    rows = [f"sentence {i}: the quick brown fox jumps over the lazy dog" for i in range(200)]
    pq.write_table(pa.table({"id": [str(i) for i in range(200)], "prompt": rows}), path, compression="snappy", use_dictionary=False)
    column = pq.ParquetFile(path).metadata.row_group(0).column(1)
    data = bytearray(path.read_bytes())
    data[column.data_page_offset + 40 : column.data_page_offset + 240] = b"\xab" * 200
    path.write_bytes(bytes(data))
    file = check_prompt_file(str(path), "p.parquet", "prompt", "id")  # the id column and the footer are intact
    with pytest.raises(UserError, match=r"p\.parquet is not a readable Parquet file \("):
        list(read_chunks(file, "prompt", "id", 50))


def test_a_fault_of_the_machine_reading_a_footer_is_not_the_users_error(tmp_path, monkeypatch):
    """Garbage is the user's file (one line); an object store's dropped connection while reading the same footer is a
    fault of the machine: it keeps its type, so the caller retries it instead of blaming the file."""
    from vocabtrim import storage

    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["hi"]}), path)
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(UserError, match=r"bad\.parquet is not a readable Parquet file \("):
        check_prompt_file(str(tmp_path / "bad.parquet"), "bad.parquet", "prompt", None)

    def dropped(where):
        raise OSError("AWS Error NETWORK_CONNECTION during GetObject operation: connection reset by peer")

    monkeypatch.setattr(storage, "open_input_file", dropped)
    with pytest.raises(OSError, match="connection reset") as raised:
        check_prompt_file(str(path), "p.parquet", "prompt", None)
    assert not isinstance(raised.value, UserError)
