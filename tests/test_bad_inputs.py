"""A corpus of bad inputs: each gives a named error (or status) and leaves every input untouched.

Models, associations, catfiles, image catalogs, reference catalogs, parameters, service
answers and file-system faults.  Each case asserts the error type and message, and that
the SHA-256 of every input file is the same before and after.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import asdf
import numpy as np
import pytest
from astropy.table import Table
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import bad_factory as bf
from conftest import make_data
from roman_tweakreg import (
    CatalogError,
    InvalidInputError,
    InvalidParameterError,
    MissingCatalogError,
    MissingInputError,
    OutputError,
    ReferenceCatalogError,
    TweakRegStep,
)
from roman_tweakreg.catalogs import CatalogSource, load_catalog, read_catalog, read_catfile
from roman_tweakreg.library import open_library
from roman_tweakreg.refcat import ConeCache
from roman_tweakreg.refcat._local import read_local_catalog
from roman_tweakreg.refcat._service import NoDataError, parse_service_csv
from roman_tweakreg.step import validate_parameters
from roman_tweakreg.testing import simulate

RA, DEC = 270.0, -30.0


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """One exposure of two detectors on disk (64 x 64 arrays, so arrays live in blocks)."""
    folder = tmp_path_factory.mktemp("good")
    exposures, stars = make_data(1, detectors=("WFI01", "WFI02"), data_shape=(64, 64),
                                 max_sources=300)
    asn = simulate.write_dataset(exposures, stars[:2000], folder)
    models = sorted(folder.glob("*_cal.asdf"))
    return folder, asn, models


@pytest.fixture(scope="module")
def good_bytes(dataset):
    return dataset[2][0].read_bytes()


def _refuse_model(tmp_path, data: bytes, error, match, name="bad_cal.asdf"):
    path = tmp_path / name
    path.write_bytes(data)
    t = time.perf_counter()
    with bf.untouched(tmp_path), pytest.raises(error, match=match) as info:
        open_library(str(path))
    assert time.perf_counter() - t < 10  # fails fast, whatever the file declares
    assert path.name in str(info.value)
    return info.value


# -- model files ---------------------------------------------------------------------------------
def test_good_model_and_small_anchor_tree_pass(dataset, good_bytes, tmp_path):
    library = open_library(str(dataset[2][0]))
    assert len(library) == 1
    path = tmp_path / "ok_cal.asdf"
    path.write_bytes(bf.yaml_bomb(good_bytes, 3, 10))  # 1000 nodes: a harmless anchor tree
    assert len(open_library(str(path))) == 1


@pytest.mark.parametrize("kind", bf.NOT_ASDF)
def test_not_an_asdf_file(tmp_path, kind):
    data = bf.not_asdf(kind, np.random.default_rng(len(kind)))
    err = _refuse_model(tmp_path, data, InvalidInputError, r"is not an ASDF file.*expected it "
                        r"to start with '#ASDF 1\.0\.0'")
    assert ("FITS" in str(err)) == (kind == "fits")


@pytest.mark.parametrize("fraction", np.round(np.linspace(0.02, 0.98, 25), 3))
def test_truncated_model(good_bytes, tmp_path, fraction):
    end = good_bytes.find(b"#ASDF BLOCK INDEX")
    _refuse_model(tmp_path, bf.truncated(good_bytes[:end], fraction), InvalidInputError,
                  r"is truncated")


@pytest.mark.parametrize(("levels", "width", "where"), [
    (7, 10, b"  meta:\n"), (8, 10, b"  meta:\n"), (9, 10, b"  meta:\n"), (5, 20, b"  meta:\n"),
    (4, 40, b"  meta:\n"), (3, 120, b"  meta:\n"), (20, 2, b"  meta:\n"), (12, 4, b"  meta:\n"),
    (30, 2, b"  meta:\n"), (8, 10, b"history:\n"), (8, 10, b"    cal_step: "),
])
def test_yaml_bomb(good_bytes, tmp_path, levels, width, where):
    if where.endswith(b": "):  # a flow mapping value: insert a whole key before it instead
        where = b"  meta:\n"
    _refuse_model(tmp_path, bf.yaml_bomb(good_bytes, levels, width, where), InvalidInputError,
                  r"anchors and aliases expand to more than 1000000 nodes")


def test_yaml_expansion_counted_exactly(good_bytes, tmp_path):
    """The expanded node count is exact: a header expanding to the limit passes, one more
    node fails (counted over the parser's events, each alias as the nodes it stands for)."""
    from roman_tweakreg._asdf_check import MAX_YAML_NODES, _check_expansion

    def header(extra: int) -> bytes:
        # a: 1 + 1,000 nodes; b: a sequence of k aliases of a, then ``extra`` scalars
        k = 997
        items = b", ".join([b"*x"] * k + [b"0"] * extra)
        return b"a: &x [" + b", ".join([b"1"] * 1000) + b"]\nb: [" + items + b"]\n"

    base = 1 + 2 + 1001 + 1 + 997 * 1001  # root, two keys, a, b, the aliases' nodes
    at_limit = MAX_YAML_NODES - base
    _check_expansion(header(at_limit), tmp_path / "ok.asdf", "input file")
    with pytest.raises(InvalidInputError, match=r"ok\.asdf: input file has a YAML header "
                       r"whose anchors and aliases expand to more than 1000000 nodes"):
        _check_expansion(header(at_limit + 1), tmp_path / "ok.asdf", "input file")


@pytest.mark.parametrize(("yaml", "match"), [
    (b"  meta:\n    bad: &r [1, *r]\n", r"the alias \*r refers to a node that contains it"),
    (b"  meta:\n    bad: [1, *nowhere]\n    again: &nowhere [2]\n",
     r"the alias \*nowhere is not defined before it"),
    (b"  meta:\n    one: &twice [1]\n    two: &twice [2]\n",
     r"the anchor &twice is defined twice"),
])
def test_yaml_aliases_broken(good_bytes, tmp_path, yaml, match):
    data = good_bytes.replace(b"  meta:\n", yaml, 1)
    _refuse_model(tmp_path, data, InvalidInputError, r"has an invalid YAML header: " + match)


def test_yaml_nested_too_deep_through_an_alias(good_bytes, tmp_path):
    deep = b"[" * 300 + b"]" * 300
    data = good_bytes.replace(
        b"  meta:\n", b"  deep: &d " + deep + b"\n  deeper: " + b"[" * 250 + b"*d"
        + b"]" * 250 + b"\n  meta:\n", 1)
    _refuse_model(tmp_path, data, InvalidInputError, r"has a YAML tree nested over 500 levels")


@pytest.mark.parametrize("megabytes", [17, 40])
def test_oversized_yaml_header(good_bytes, tmp_path, megabytes):
    i = good_bytes.index(b"  meta:\n") + len(b"  meta:\n")
    line = b"    - 'a long log line padding the header of this file out to many megabytes'\n"
    filler = b"    log:\n" + line * (megabytes * 2**20 // len(line))
    _refuse_model(tmp_path, good_bytes[:i] + filler + good_bytes[i:], InvalidInputError,
                  r"has a YAML header larger than 16\.8 MB; a Roman image's header is well "
                  r"under 1 MB")


@pytest.mark.parametrize(("shape", "nth", "match"), [
    ((200000, 200000), 0, r"declares an array of shape \(200000, 200000\), more than"),
    ((10**6, 10**6), 1, r"shape \(1000000, 1000000\), more than"),
    ((4096, 4096, 4096), 2, r"shape \(4096, 4096, 4096\), more than"),
    ((2**31, 1), 0, r"shape \(2147483648, 1\), more than"),
    ((16385, 16384), 0, r"shape \(16385, 16384\) \(1\.1 GB\), more than"),
    ((64, 65), 0, r"shape \(64, 65\) \(float32, 16640 bytes\) in block 0, which holds only "
                  r"16384 bytes"),
    ((128, 128), 1, r"shape \(128, 128\) .* which holds only"),
    ((64, 64, 2), 0, r"shape \(64, 64, 2\) .* which holds only"),
    ((-1, 64), 0, r"shape \(-1, 64\): expected sizes >= 0"),
    ((64, -64), 3, r"shape \(64, -64\): expected sizes >= 0"),
])
def test_absurd_array_shape(good_bytes, tmp_path, shape, nth, match):
    _refuse_model(tmp_path, bf.with_shape(good_bytes, shape, nth), InvalidInputError, match)


@pytest.mark.parametrize("block", [0, 3, -1])
@pytest.mark.parametrize("size", [2**31, 2**40, 2**63])
def test_compression_bomb(good_bytes, tmp_path, block, size):
    n = len(bf.block_offsets(good_bytes))
    data = bf.block_field(good_bytes, block % n, "data_size", size)
    _refuse_model(tmp_path, data, InvalidInputError,
                  rf"block \({block % n}\) that decompresses to [\d.]+ [GTP]B, more "
                  r"than the 1\.1 GB accepted per array \(a compression bomb\?")


@pytest.mark.parametrize(("field", "value", "match"), [
    ("header_size", 10, r"header size 10 is under the 48 bytes"),
    ("allocated", 2**40, r"is truncated: block 0 at byte \d+ declares 1099511627776 bytes"),
    ("used", 2**20, r"is truncated: block 0"),
])
def test_corrupt_block_header(good_bytes, tmp_path, field, value, match):
    _refuse_model(tmp_path, bf.block_field(good_bytes, 0, field, value), InvalidInputError, match)


@pytest.mark.parametrize("block", [1, 2, 5])
def test_garbage_instead_of_a_block(good_bytes, tmp_path, block):
    _refuse_model(tmp_path, bf.garbage_block(good_bytes, block), InvalidInputError,
                  rf"is corrupt: expected ASDF block {block} at byte \d+, found b'JUNK")


def test_hostile_file_among_good_ones_stops_the_step_before_work(dataset, good_bytes, tmp_path):
    """Through the step: the hostile file is named within seconds, nothing is written."""
    bomb = tmp_path / "r0000101001001001001_0002_wfi03_cal.asdf"
    bomb.write_bytes(bf.yaml_bomb(good_bytes, 9, 10))
    out = tmp_path / "out"
    t = time.perf_counter()
    with bf.untouched(dataset[0]), pytest.raises(InvalidInputError, match=re.escape(bomb.name)):
        TweakRegStep.call([*map(str, dataset[2]), str(bomb)], output_dir=str(out),
                          save_results=True, report="r.json")
    assert time.perf_counter() - t < 20
    assert not out.exists() or not list(out.iterdir())


# -- associations and file lists ----------------------------------------------------------------
@pytest.mark.parametrize(("text", "match"), [
    ("{", r"not a JSON association file"),
    ("nope", r"not a JSON association file"),
    ("", r"not a JSON association file"),
    ("[]", r"an association needs products\[0\]\.members\[\*\]\.expname"),
    ('{"products": []}', r"needs products\[0\]"),
    ('{"products": [{"members": "abc"}]}', r"needs products\[0\]"),
    ('{"products": [{"members": [{}]}]}', r"needs products\[0\]"),
    ('{"products": [{"name": "x"}]}', r"needs products\[0\]"),
    ('{"products": [{"members": []}]}', r"first product has no members"),
    ('{"products": [{"members": [{"expname": 5}]}]}', r"member 0 has expname 5, expected a file"),
    ('{"products": [{"members": [{"expname": null}]}]}', r"member 0 has expname None"),
    ('{"products": [{"members": [{"expname": ["a"]}]}]}', r"member 0 has expname \['a'\]"),
    # issue 28: a RecursionError and "ValueError: embedded null byte" before
    ("[" * 200_000 + "]" * 200_000, r"asn\.json: not an association: its JSON is nested too "
                                    r"deeply to read"),
    ('{"products": [{"members": [{"expname": "a\\u0000b_cal.asdf"}]}]}',
     r"asn\.json: member 0 has expname 'a\\x00b_cal\.asdf', which holds a NUL byte"),
    ('{"products": [{"members": [{"expname": "a_cal.asdf", "group_id": 1}, '
     '{"expname": "b_cal.asdf", "group_id": "1"}]}]}',
     r"asn\.json: members 0 and 1 have group_id 1 \(int\) and '1' \(str\), which would be "
     r"taken as one exposure group; write every group_id as a string"),
    ('{"products": [{"members": [{"expname": "a_cal.asdf", "group_id": [1]}]}]}',
     r"member 0 has group_id \[1\] \(list\), expected a string"),
])
def test_bad_association_json(tmp_path, text, match):
    path = tmp_path / "asn.json"
    path.write_text(text)
    with bf.untouched(tmp_path), pytest.raises(InvalidInputError, match=match):
        open_library(str(path))


def test_association_not_utf8(tmp_path):
    path = tmp_path / "asn.json"
    path.write_bytes(b"\xff\xfe{\x00")
    with bf.untouched(tmp_path), pytest.raises(InvalidInputError, match=r"asn\.json: not a JSON"):
        open_library(str(path))


def _members_asn(folder, names, extra=None):
    asn = {"products": [{"name": "p", "members": [{"expname": n} for n in names]}]}
    path = folder / "asn.json"
    path.write_text(json.dumps(asn | (extra or {})))
    return path


@pytest.mark.parametrize("second", ["{name}", "./{name}", "sub/../{name}"])
def test_association_member_listed_twice(dataset, tmp_path, second):
    name = dataset[2][0].name
    shutil.copy(dataset[2][0], tmp_path / name)
    (tmp_path / "sub").mkdir()
    asn = _members_asn(tmp_path, [name, dataset[2][1].name, second.format(name=name)])
    shutil.copy(dataset[2][1], tmp_path)
    with bf.untouched(tmp_path), pytest.raises(
        InvalidInputError, match=rf"asn\.json: member 2 \(.*{re.escape(name)}\) is listed twice "
                                 r"\(also member 0\)"):
        open_library(str(asn))


@pytest.mark.parametrize("case", ["lower", "same"])
def test_association_same_name_in_two_folders(dataset, tmp_path, case):
    name = dataset[2][0].name
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
    shutil.copy(dataset[2][0], tmp_path / "a" / name)
    other = name if case == "same" else name.upper().replace(".ASDF", ".asdf")
    shutil.copy(dataset[2][1], tmp_path / "b" / other)
    asn = _members_asn(tmp_path, [f"a/{name}", f"b/{other}"])
    with bf.untouched(tmp_path), pytest.raises(
        InvalidInputError,
        match=rf"members 0 \(.*a/{re.escape(name)}\) and 1 \(.*b/{re.escape(other)}\) have the "
              rf"same file name, so both would be written to the output {re.escape(other)}"):
        open_library(str(asn))


def test_file_list_same_name_in_two_folders_and_twice(dataset, tmp_path):
    name = dataset[2][0].name
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        shutil.copy(dataset[2][0], tmp_path / sub / name)
    with bf.untouched(tmp_path):
        with pytest.raises(InvalidInputError, match=r"the input list: members 0 .*a/.* and 1 "
                                                    r".*b/.* have the same file name"):
            open_library([tmp_path / "a" / name, tmp_path / "b" / name])
        with pytest.raises(InvalidInputError, match=r"member 1 .* is listed twice"):
            open_library([tmp_path / "a" / name, tmp_path / "a" / name])
        with pytest.raises(InvalidInputError, match=r"members 0 .* and 1 .* same file name"):
            TweakRegStep.call([str(tmp_path / "a" / name), str(tmp_path / "b" / name)])


def test_in_memory_models_with_one_filename(dataset):
    from roman_datamodels import datamodels as rdm

    models = [rdm.open(p) for p in dataset[2]]
    models[1].meta.filename = models[0].meta.filename
    with pytest.raises(InvalidInputError, match=r"input models 0 and 1 have the same "
                                                r"meta\.filename 'r0000101001001001001_0001_wfi01"):
        open_library(models)
    # nothing saved under the models' names (TweakRegStep.call without saving): accepted
    assert len(open_library(models, named_outputs=False)) == 2


def test_library_whose_meta_filenames_collide_is_not_saved(dataset, tmp_path, monkeypatch):
    """A ModelLibrary given as is (not checked up front) whose models share meta.filename:
    refused before any output is written; the report says none exists."""
    from roman_datamodels import datamodels as rdm

    from roman_tweakreg import ModelLibrary

    models = [rdm.open(p) for p in dataset[2]]
    models[1].meta.filename = models[0].meta.filename
    monkeypatch.chdir(dataset[0])  # where the models' relative catalog names are found
    out = tmp_path / "out"
    with bf.untouched(dataset[0]), pytest.raises(
        OutputError, match=r"images 0 and 1 have the same meta\.filename "
                           r"'r0000101001001001001_0001_wfi01_cal\.asdf': both would be saved "
                           r"to one output, so none was saved"):
        TweakRegStep.call(ModelLibrary(models), **_step_kw(
            dataset, save_results=True, output_dir=str(out), report="r.json"))
    assert sorted(p.name for p in out.iterdir()) == ["r.json"]
    assert json.loads((out / "r.json").read_text())["outputs"]["written"] == 0


@pytest.mark.parametrize(("member", "error", "match"), [
    ("missing", MissingInputError, r"gone_cal\.asdf: association member file does not exist"),
    ("folder", InvalidInputError, r"folder_cal\.asdf: association member file is a folder"),
    ("fits", InvalidInputError, r"fits_cal\.asdf: association member file is not an ASDF "
                                r"file \(a FITS file\?\)"),
    ("truncated", InvalidInputError, r"truncated_cal\.asdf: association member file is "
                                     r"truncated"),
    ("bomb", InvalidInputError, r"bomb_cal\.asdf: association member file has a YAML header"),
])
def test_bad_association_member(dataset, good_bytes, tmp_path, member, error, match):
    shutil.copy(dataset[2][1], tmp_path)
    name = f"{'gone' if member == 'missing' else member}_cal.asdf"
    if member == "folder":
        (tmp_path / name).mkdir()
    elif member == "fits":
        (tmp_path / name).write_bytes(bf.not_asdf("fits", np.random.default_rng(0)))
    elif member == "truncated":
        (tmp_path / name).write_bytes(good_bytes[: len(good_bytes) // 2])
    elif member == "bomb":
        (tmp_path / name).write_bytes(bf.yaml_bomb(good_bytes, 8, 10))
    asn = _members_asn(tmp_path, [dataset[2][1].name, name])
    with bf.untouched(tmp_path), pytest.raises(error, match=match):
        open_library(str(asn))


# -- catfiles -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("content", "error", "match"), [
    ("a.asdf b.ecsv c\n", CatalogError, r"line 1: expected '<model file> \[<catalog file>\]', "
                                        r"found 3 columns"),
    ("# ok\na.asdf b.ecsv\nx y z w\n", CatalogError, r"line 3: .*found 4 columns"),
    ("a.asdf\tb.ecsv\tc.ecsv\n", CatalogError, r"line 1: .*found 3 columns"),
    (b"\xff\xfe\x00a", CatalogError, r"cannot be read"),
    (None, MissingCatalogError, r"catfile .*catfile\.txt does not exist"),
    ("folder", CatalogError, r"catfile\.txt: catfile is a folder, not a regular file"),
])
def test_bad_catfile(tmp_path, content, error, match):
    path = tmp_path / "catfile.txt"
    if content == "folder":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with bf.untouched(tmp_path), pytest.raises(error, match=match):
        read_catfile(path)


# -- image catalogs -----------------------------------------------------------------------------
PAIRS = (("x", "y"), ("xcentroid", "ycentroid"), ("x_centroid", "y_centroid"), ("x_psf", "y_psf"))


def _read(tmp_path, path):
    """Read a catalog for image "img" (every case fails before the WCS is used)."""
    with bf.untouched(tmp_path):
        return load_catalog(CatalogSource(str(path), "catfile test"), "img", None)


@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("token", ["abc", "1.2.3", "--x"])
def test_text_in_a_pixel_column(tmp_path, pair, axis, token):
    rng = np.random.default_rng(7)
    cols = {pair[0]: rng.uniform(0, 100, 5).astype(str), pair[1]: rng.uniform(0, 100, 5)
            .astype(str)}
    cols[pair[axis]][3] = token
    if axis == 0:
        cols[pair[1]] = cols[pair[1]].astype(float)
    else:
        cols[pair[0]] = cols[pair[0]].astype(float)
    path = tmp_path / "cat.ecsv"
    Table(cols).write(path)
    with pytest.raises(CatalogError, match=rf"img: catalog {re.escape(str(path))}: column "
                                           rf"'{pair[axis]}' is not numeric: expected numbers"):
        _read(tmp_path, path)


@pytest.mark.parametrize(("column", "match"), [
    ("weight", r"column 'weight' is not numeric: expected numbers"),
    ("warning_flags", r"column 'warning_flags' is not numeric: expected integers"),
])
def test_text_in_weight_or_flags(tmp_path, column, match):
    path = tmp_path / "cat.ecsv"
    Table({"x": [1.0, 2.0], "y": [1.0, 2.0], column: ["a", "b"]}).write(path)
    with pytest.raises(CatalogError, match=match):
        _read(tmp_path, path)


@pytest.mark.parametrize(("name", "content", "error", "match"), [
    ("cat.ecsv", "# %ECSV 1.0\n# ---\n# datatype:\n# - {name: ra, datatype: float64}\nra\n1\n",
     CatalogError, r"catalog .*cat\.ecsv has no pixel columns; found \['ra'\]"),
    ("cat.ecsv", "", CatalogError, r"cannot read catalog .*cat\.ecsv as ascii\.ecsv"),
    ("cat.ecsv", b"\x00\x01\x02garbage", CatalogError, r"cannot read catalog .*cat\.ecsv"),
    ("cat.ecsv", b"SIMPLE  =                    T", CatalogError, r"cannot read catalog"),
    ("cat.ecsv", "# %ECSV 1.0\n# ---\n# datatype:\n# - {name: x, dat", CatalogError,
     r"cannot read catalog .*cat\.ecsv"),
    ("cat.parquet", b"PAR1garbagePAR1", CatalogError, r"cannot read catalog .*cat\.parquet"),
    ("cat.asdf", "asdf-no-table", CatalogError, r"cat\.asdf: no table found in the ASDF file"),
    ("nothere.ecsv", None, MissingCatalogError, r"img: catalog named by catfile test does not "
                                                r"exist; tried .*nothere\.ecsv"),
])
def test_unreadable_catalog(tmp_path, name, content, error, match):
    path = tmp_path / name
    if content == "asdf-no-table":
        asdf.AsdfFile({"numbers": [1, 2, 3]}).write_to(path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(error, match=match):
        _read(tmp_path, path)


def test_two_dimensional_pixel_column(tmp_path):
    path = tmp_path / "cat.ecsv"
    Table({"x": np.ones((3, 2)), "y": np.ones(3)}).write(path)
    with pytest.raises(CatalogError, match=r"column 'x' has shape \(3, 2\), expected one value"):
        _read(tmp_path, path)


# -- reference catalogs -------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "content", "match"), [
    ("r.csv", "a,b\n1,2\n", r"r\.csv has no RA/DEC \(any case\) or sky_centroid column"),
    ("r.csv", "ra,dec\nx,1\n", r"r\.csv: column ra is not numeric"),
    ("r.csv", "ra,dec\n1,y\n", r"r\.csv: column dec is not numeric"),
    ("r.csv", "ra,dec,pmra\n1,1,fast\n", r"r\.csv: column pmra is not numeric"),
    ("r.csv", "ra,dec,parallax\n1,1,far\n", r"r\.csv: column parallax is not numeric"),
    ("r.csv", "", r"r\.csv has no RA/DEC \(any case\) or sky_centroid column; found \[\]"),
    ("r.fits", "SIMPLE = what", r"cannot read .*r\.fits"),
    ("r.parquet", "PAR1 not parquet", r"cannot read .*r\.parquet"),
    ("r.ecsv", "# %ECSV 1.0\n# ---\nra dec\n", r"cannot read .*r\.ecsv"),
])
def test_bad_reference_catalog_file(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_text(content)
    with bf.untouched(tmp_path), pytest.raises(ReferenceCatalogError, match=match):
        read_local_catalog(path, RA, DEC, 0.1)


@pytest.mark.parametrize("case", ["empty", "bad_index", "index_names_missing", "bad_partition"])
def test_bad_hats_folder(tmp_path, case):
    root = tmp_path / "hats"
    root.mkdir()
    part = root / "Norder=0" / "Dir=0"
    if case == "bad_index":
        (root / "partition_info.csv").write_text("order,pixel\n0,4\n")
        match = r"partition_info\.csv: cannot read the HATS partition index \(expected Norder"
    elif case == "index_names_missing":  # the index names the partition over the cone
        from astropy import units as u
        from astropy_healpix import HEALPix

        pixel = HEALPix(nside=1, order="nested").lonlat_to_healpix(RA * u.deg, DEC * u.deg)
        (root / "partition_info.csv").write_text(f"Norder,Npix\n0,{pixel}\n")
        match = r"cannot read HATS catalog .*hats"
    elif case == "bad_partition":
        part.mkdir(parents=True)
        for p in range(12):
            (part / f"Npix={p}.parquet").write_bytes(b"not parquet")
        match = r"cannot read HATS catalog .*hats"
    else:
        match = r"hats is a folder but not a HATS catalog"
    with bf.untouched(tmp_path), pytest.raises(ReferenceCatalogError, match=match):
        read_local_catalog(root, RA, DEC, 0.5)


# -- parameters ---------------------------------------------------------------------------------
_BAD_PARAMETERS = [
    ("minobj", 0, r"expected an integer >= 1"), ("minobj", -1, r"expected an integer >= 1"),
    ("minobj", 1.5, r"expected an integer >= 1"), ("minobj", "5", r"expected an integer >= 1"),
    ("minobj", None, r"expected an integer >= 1"),
    ("searchrad", 0, r"expected a number in \(0, 176\]"),
    ("searchrad", -1.0, r"expected a number in \(0, 176\]"),
    ("searchrad", "2", r"expected a number in \(0, 176\]"),
    ("searchrad", None, r"expected a number in \(0, 176\]"),
    # issue 28: numpy asked for 2.35 PiB; an OverflowError
    ("searchrad", 1e6, r"expected a number in \(0, 176\] \(arcsec\): the offset search's 2D "
                       r"histogram .* more than 256 MiB beyond 176 arcsec"),
    ("searchrad", 1e308, r"expected a number in \(0, 176\] \(arcsec\): the offset search's"),
    ("separation", 0.0, r"expected a number > 0"), ("separation", -0.5, r"expected a number > 0"),
    ("tolerance", 0, r"expected a number > 0"), ("tolerance", -1, r"expected a number > 0"),
    ("tolerance", 100.0, r"is larger than .*searchrad=.*must not exceed the search radius"),
    ("sigma", 0, r"expected a number > 0"), ("sigma", -3.0, r"expected a number > 0"),
    ("sigma", float("nan"), r"expected a number > 0"),
    ("nclip", -1, r"expected an integer >= 0"), ("nclip", 1.5, r"expected an integer >= 0"),
    ("fitgeometry", "affine", r"expected one of shift, rshift, rscale, general"),
    ("fitgeometry", "", r"expected one of shift"), ("fitgeometry", "SHIFT", r"expected one of"),
]


@pytest.mark.parametrize("prefix", ["", "abs_"])
@pytest.mark.parametrize(("name", "value", "match"), _BAD_PARAMETERS)
def test_bad_parameter(prefix, name, value, match):
    pars = TweakRegStep().get_pars()
    pars[prefix + name] = value
    with pytest.raises(InvalidParameterError, match=rf"{prefix}{name}=.*{match}"):
        validate_parameters(pars)


# -- service answers ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def body():
    return bf.service_body(40, np.random.default_rng(11))


@pytest.mark.parametrize(("answer", "error", "match"), [
    (b"<html><title>Runtime Error</title></html>", ReferenceCatalogError,
     r"answered an HTML page, not CSV: 'Runtime Error'"),
    (b"<!DOCTYPE html><p>busy</p>", ReferenceCatalogError, r"answered an HTML page"),
    (b"   \n <HTML>down</HTML>", ReferenceCatalogError, r"answered an HTML page"),
    (b"", ReferenceCatalogError, r"svc: empty answer"),
    (b" \n\n\t ", ReferenceCatalogError, r"svc: empty answer"),
    (b"No data records found", NoDataError, r"No data records: no sources in the cone"),
    (b"#only\n#comments\n", ReferenceCatalogError, r"the answer has no CSV header"),
    (b"objID,ra,dec\n", NoDataError, r"the answer has a header but no rows"),
    (b"objID,alpha,dec\n1,2,3\n", ReferenceCatalogError, r"lacks column\(s\) ra; "),
    (b"objID,ra,delta\n1,2,3\n", ReferenceCatalogError, r"lacks column\(s\) dec; "),
    (b"a,b\n1,2\n", ReferenceCatalogError, r"lacks column\(s\) ra, dec"),
    (b"objID,ra,dec\n1,,3\n", ReferenceCatalogError, r"ra/dec not numeric"),
    (b"objID,ra,dec\n1,2,\n", ReferenceCatalogError, r"ra/dec not numeric"),
    (b"objID,ra,dec\n1,x,3\n", ReferenceCatalogError, r"truncated or malformed CSV"),
    (b"objID,ra,dec,pmra\n1,2,3,fast\n", ReferenceCatalogError, r"truncated or malformed CSV"),
    (b"objID,ra,dec\n1,2,3,4\n", ReferenceCatalogError, r"data row 1 of 1 has 4 fields, the "
                                                        r"header has 3"),
    (b"obj\xffID,ra,dec\n1,2,3\n", ReferenceCatalogError, r"the CSV header is not UTF-8"),
    (b"objID,ra,dec\n1,\xff\xfe,3\n", ReferenceCatalogError, r"truncated or malformed CSV"),
])
def test_bad_service_answer(answer, error, match):
    with pytest.raises(error, match=match):
        parse_service_csv(answer, "svc")


@pytest.mark.parametrize("row", [0, 3, 7, 11, 19, 23, 31, 38])
def test_service_answer_cut_short(body, row):
    with pytest.raises(ReferenceCatalogError, match=rf"truncated or malformed CSV: data row "
                                                    rf"{row + 1} of {row + 1} has 4 fields, the "
                                                    r"header has 8"):
        parse_service_csv(bf.cut_after_comma(body, row), "svc")


@pytest.mark.parametrize("row", [1, 9, 17, 33])
@pytest.mark.parametrize("column", [1, 2])
def test_service_answer_text_value(body, row, column):
    lines = body.split(b"\n")
    fields = lines[2 + row].split(b",")
    fields[column] = b"n/a!"
    lines[2 + row] = b",".join(fields)
    with pytest.raises(ReferenceCatalogError, match=r"truncated or malformed CSV: .*n/a!"):
        parse_service_csv(b"\n".join(lines), "svc")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300) | st.text(alphabet="ra,dec\n#0123456789.-e x", max_size=200)
       .map(str.encode))
@example(b"\r\x00")  # a carriage return and NUL: the csv module's own error, once raw
@example(b"ra,dec\r\x00\n1,2")
def test_service_answers_of_any_bytes_give_a_catalog_or_a_named_error(answer):
    try:
        out = parse_service_csv(answer, "svc")
    except ReferenceCatalogError as err:
        message = str(err)
    else:
        message = ""
        assert np.isfinite(out["RA"]).all()
        assert len(out["RA"]) > 0
    assert message == "" or message.startswith("svc: ")


@pytest.mark.parametrize(("fault", "options", "match"), [
    ("trickle", {"timeout": 0.5, "retries": 1},
     r"took longer than the 0\.5 s timeout \(a deadline per try, body included"),
    ("gzipbomb", {"max_bytes": 500_000},
     r"larger than the limit abs_refcat_max_bytes=500000 bytes \(Content-Encoding gzip\)"),
    ("endless", {"max_bytes": 500_000}, r"larger than the limit abs_refcat_max_bytes=500000"),
])  # fmt: skip
@pytest.mark.parametrize("where", ["GAIADR3", "/files/field.ecsv"])
def test_hostile_service_ends_in_a_named_error_within_the_deadline(gaia_service, fault, options,
                                                                   match, where):
    # issue 28: these hung (one byte every 2 s) or took all the memory (4 MB -> 4 GB)
    from roman_tweakreg.refcat import get_reference_catalog

    gaia_service.always, gaia_service.delay = fault, 0.2
    refcat = where if where == "GAIADR3" else gaia_service.url + where
    start = time.perf_counter()
    with pytest.raises(ReferenceCatalogError, match=match):
        get_reference_catalog(refcat, 150.1, 2.2, 0.1, base_url=gaia_service.url,
                              use_cache=False, backoff=0.01, **{"timeout": 5.0, **options})
    assert time.perf_counter() - start < 2 * 0.5 + 1.5


# -- the catalog cache --------------------------------------------------------------------------
SVC = "http://127.0.0.1:9/svc"


def _cache_with_entry(tmp_path, body, radius=0.49):
    cache = ConeCache(tmp_path / "cache")
    path = cache.put(SVC, "GAIADR3", RA, DEC, radius, 2028.0, body)
    assert path is not None
    assert cache.get(SVC, "GAIADR3", RA, DEC, 0.3, 2028.0) is not None
    return cache, path


def test_cache_entry_renamed_to_claim_a_larger_cone_is_not_served(tmp_path, body):
    cache, path = _cache_with_entry(tmp_path, body)
    path.rename(path.with_name(f"{RA!r}_{DEC!r}_1.0.cone"))
    assert cache.get(SVC, "GAIADR3", RA, DEC, 0.9, 2028.0) is None  # the header says 0.49
    entry = cache.get(SVC, "GAIADR3", RA, DEC, 0.3, 2028.0)
    assert entry is not None
    assert entry.radius == 0.49


@pytest.mark.parametrize("edit", [(b'"radius": 0.49', b'"radius": 1.0'),
                                  (b'"ra": 270.0', b'"ra": 270.1'),
                                  (b'"epoch": 2028.0', b'"epoch": 2029.0')])
def test_cache_entry_with_an_edited_header_fails_its_checksum(tmp_path, body, edit):
    cache, path = _cache_with_entry(tmp_path, body)
    data = path.read_bytes()
    assert edit[0] in data
    path.write_bytes(data.replace(*edit))
    assert cache.get(SVC, "GAIADR3", RA, DEC, 0.3, 2028.0) is None
    assert cache.get(SVC, "GAIADR3", RA + 0.05, DEC, 0.3, 2029.0) is None


def test_cache_does_not_write_through_a_planted_folder_link(tmp_path, body):
    cache, path = _cache_with_entry(tmp_path, body)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.rmtree(path.parent)
    path.parent.symlink_to(elsewhere, target_is_directory=True)
    with bf.untouched(elsewhere):
        assert cache.put(SVC, "GAIADR3", RA, DEC, 0.49, 2028.0, body) is None
    assert list(elsewhere.iterdir()) == []


def test_cache_does_not_read_a_planted_entry_link(tmp_path, body):
    cache, path = _cache_with_entry(tmp_path, body)
    target = tmp_path / "planted.cone"
    path.rename(target)
    path.symlink_to(target)
    with bf.untouched(tmp_path / "cache"):
        assert cache.get(SVC, "GAIADR3", RA, DEC, 0.3, 2028.0) is None
    assert target.exists()  # the link's target is never touched


def test_cache_write_replaces_a_planted_file_link_not_its_target(tmp_path, body):
    cache, path = _cache_with_entry(tmp_path, body)
    target = tmp_path / "victim.txt"
    target.write_text("keep me")
    path.unlink()
    path.symlink_to(target)
    assert cache.put(SVC, "GAIADR3", RA, DEC, 0.49, 2028.0, body) == path
    assert target.read_text() == "keep me"
    assert not path.is_symlink()


# -- file-system faults -------------------------------------------------------------------------
def _step_kw(dataset, **kw):
    return {"abs_refcat": str(dataset[0] / "gaia.ecsv"), "processes": 1} | kw


@pytest.mark.parametrize(("parameter", "where", "match"), [
    ("output_dir", "proc", r"/proc/sys/roman: the folder for output_dir \(the models' "
                           r"outputs\) cannot be written"),
    ("report", "file", r"asn\.json: the folder for report cannot be written: a file of that "
                       r"name is in the way"),
    ("catalog_path", "under_file", r"the folder for catalog_path cannot be written: a part of "
                                   r"the path is a file"),
    ("save_abs_catalog", "proc", r"/proc/sys/roman: the folder for save_abs_catalog cannot be "
                                 r"written"),
])
def test_unwritable_output_place_is_found_before_work(dataset, tmp_path, parameter, where,
                                                      match):
    folder, asn, _ = dataset
    place = {"proc": "/proc/sys/roman", "file": str(asn / "r.json"),
             "under_file": str(asn / "cats")}[where]
    kw = {"save_results": True, "output_dir": str(tmp_path / "out")}
    if parameter == "output_dir":
        kw = {"save_results": True, "output_dir": place}
    elif parameter == "save_abs_catalog":
        kw = {"save_abs_catalog": True}
    else:
        kw[parameter] = place
    if parameter in ("output_dir", "save_abs_catalog"):
        # stpipe makes output_dir before process(): the step is given it afterwards
        step = TweakRegStep(**_step_kw(dataset, **kw))
        step.output_dir = place
        run = step.process
    else:
        step = TweakRegStep(**_step_kw(dataset, **kw))
        run = step.run
    t = time.perf_counter()
    with bf.untouched(folder), pytest.raises(OutputError, match=match) as info:
        run(str(asn))
    assert "nothing was aligned" in str(info.value)
    assert time.perf_counter() - t < 10
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.asdf"))


@pytest.mark.parametrize("fault", ["enospc", "interrupt"])
def test_disk_full_or_interrupt_while_saving(dataset, tmp_path, monkeypatch, fault):
    """ENOSPC (or Ctrl-C) on the second output: the error names it and the first output;
    the report, written last, says which outputs exist; no half-written file."""
    from roman_datamodels import datamodels as rdm

    real, calls = rdm.DataModel.save, []

    def save(self, path, *args, **kwargs):
        calls.append(path) if "_tweakregstep" in str(path) else None  # not the _wcs products
        if len(calls) == 2 and "_tweakregstep" in str(path):
            Path(path).write_bytes(b"#ASDF half")
            if fault == "interrupt":
                raise KeyboardInterrupt
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(rdm.DataModel, "save", save)
    out = tmp_path / "out"
    error, match = (KeyboardInterrupt, None) if fault == "interrupt" else (
        OutputError, r"wfi02_cal_tweakregstep\.asdf: output not written: the disk is full "
                     r"\(ENOSPC\).*; 1 of 2 outputs \(each a model with its _wcs\.asdf product\) "
                     r"were written \(.*wfi01_cal_tweakregstep"
                     r"\.asdf\); the others do not exist")
    step = TweakRegStep(**_step_kw(dataset, save_results=True, output_dir=str(out),
                                   report="r.json"))
    with bf.untouched(dataset[0]), pytest.raises(error, match=match):
        step.run(str(dataset[1]))
    assert sorted(p.name for p in out.iterdir()) == [  # no half file
        "r.json", "r0000101001001001001_0001_wfi01_cal_tweakregstep.asdf",
        "r0000101001001001001_0001_wfi01_cal_wcs.asdf"]
    report = json.loads((out / "r.json").read_text())
    assert report["outputs"] == {"expected": 2, "written": 1, "complete": False,
                                 "missing": ["r0000101001001001001_0001_wfi02_cal.asdf"]}
    assert [i["output"] is not None for i in report["images"]] == [True, False]
    assert report["statuses"]["cal_step"] == {"COMPLETE": 2}


def test_out_of_memory_while_saving_one_model(dataset, tmp_path, monkeypatch):
    from roman_datamodels import datamodels as rdm

    def save(self, path, *args, **kwargs):
        raise MemoryError

    model = rdm.open(dataset[2][0])
    monkeypatch.setattr(rdm.DataModel, "save", save)
    step = TweakRegStep(output_dir=str(tmp_path))
    with pytest.raises(OutputError, match=r"wfi01_cal_tweakregstep\.asdf: output not written: "
                                          r"not enough memory to write it"):
        step.save_model(model, force=True)
    assert list(tmp_path.iterdir()) == []
    assert model.meta.filename == "r0000101001001001001_0001_wfi01_cal.asdf"


_EFBIG_RUN = """
import resource, sys
from roman_tweakreg import TweakRegStep
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[4]), int(sys.argv[4])))
TweakRegStep.call(sys.argv[1], abs_refcat=sys.argv[2], output_dir=sys.argv[3],
                  save_results=True, report="r.json", processes=1)
"""


def test_file_size_limit_while_saving(dataset, tmp_path):
    """EFBIG from a real file-size limit (RLIMIT_FSIZE) in a child process (the first
    file written, the _wcs.asdf product written before its model, is the one refused)."""
    out = tmp_path / "out"
    size = dataset[2][0].stat().st_size  # outputs are a little larger than inputs
    env = os.environ | {"PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    with bf.untouched(dataset[0]):
        run = subprocess.run(
            [sys.executable, "-c", _EFBIG_RUN, str(dataset[1]), str(dataset[0] / "gaia.ecsv"),
             str(out), str(size)],
            capture_output=True, text=True, env=env, timeout=300, check=False)
    assert run.returncode != 0
    assert re.search(r"OutputError: .*wfi01_cal_wcs\.asdf: output not written: the "
                     r"file is larger than allowed \(EFBIG: file size limit\).*; 0 of 2 outputs "
                     r"\(each a model with its _wcs\.asdf product\) were written; the others "
                     r"do not exist", run.stderr), run.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["r.json"]
    report = json.loads((out / "r.json").read_text())
    assert report["outputs"]["written"] == 0
    assert not report["outputs"]["complete"]
    assert report["statuses"]["cal_step"] == {"COMPLETE": 2}  # aligned, but nothing saved


def test_detected_catalogs_go_to_output_dir(dataset, tmp_path, monkeypatch):
    """Catalogs the step writes go beside the outputs, not to the current folder."""
    exposures, _stars = make_data(1, detectors=("WFI01", "WFI02"), data_shape=(32, 32))
    for model in exposures[0].models:
        del model.meta["tweakreg_catalog"]
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    result = TweakRegStep.call(exposures[0].models, output_dir=str(out), abs_refcat_retries=0,
                               bkg_boxsize=16, processes=1)
    written = sorted(p.name for p in out.glob("*_cat.ecsv"))
    assert written == ["r0000101001001001001_0001_wfi01_cal_cat.ecsv",
                       "r0000101001001001001_0001_wfi02_cal_cat.ecsv"]
    assert not list(tmp_path.glob("*_cat.ecsv"))
    assert {"x", "y"} <= set(Table.read(out / written[0]).colnames)
    assert len(result) == 2


# -- inputs are never outputs -------------------------------------------------------------------
WFI01 = "r0000101001001001001_0001_wfi01_cal.asdf"


def _inputs_folder(dataset, tmp_path, names=(WFI01,)) -> Path:
    """A folder holding copies of the dataset's first model under ``names``, its catalog
    and the reference catalog."""
    folder, _, models = dataset
    inp = tmp_path / "in"
    inp.mkdir()
    for name in names:
        if name == models[0].name:
            shutil.copy(models[0], inp / name)
            continue
        with asdf.open(models[0], lazy_load=False, memmap=False) as af:
            af.tree["roman"]["meta"]["filename"] = name  # as a file renamed by its writer
            af.write_to(inp / name)
    for other in ("r0000101001001001001_0001_wfi01_cat.ecsv", "gaia.ecsv"):
        shutil.copy(folder / other, inp / other)
    return inp


def _overwrite_case(case, dataset, tmp_path):
    """(the step's input, parameters, the input that an output would be, what chose the name)."""
    stem = WFI01.removesuffix(".asdf")
    if case == "output_file_and_suffix":  # the strun command
        inp = _inputs_folder(dataset, tmp_path)
        return (inp / WFI01, {"output_dir": str(inp), "output_file": stem.removesuffix("_cal"),
                              "suffix": "cal"}, WFI01, r"output_file=.*suffix='cal'")
    if case == "suffix":  # a.asdf's output a_cal.asdf is the other input
        inp = _inputs_folder(dataset, tmp_path, names=("a.asdf", "a_cal.asdf"))
        return ([str(inp / "a.asdf"), str(inp / "a_cal.asdf")],
                {"output_dir": str(inp), "suffix": "cal"}, "a_cal.asdf",
                r"from the input's file name 'a\.asdf'.*suffix='cal'")
    if case in ("association_member", "association_product"):
        other = f"{stem}_{'tweakregstep' if case == 'association_member' else 'wcs'}.asdf"
        inp = _inputs_folder(dataset, tmp_path, names=(WFI01, other))
        asn = _members_asn(inp, [WFI01, other])
        what = "model output" if case == "association_member" else r"_wcs\.asdf product"
        return (asn, {"output_dir": str(inp)}, other,
                rf"the {what} of image 0, named from the input's file name '{WFI01}'")
    if case == "output_dir_link":  # output_dir a symbolic link to the inputs' folder
        inp = _inputs_folder(dataset, tmp_path)
        (tmp_path / "link").symlink_to(inp, target_is_directory=True)
        return (inp / WFI01, {"output_dir": str(tmp_path / "link"),
                              "output_file": stem.removesuffix("_cal"), "suffix": "cal"},
                WFI01, "once symbolic links are resolved")
    if case in ("output_name_link", "hard_link"):  # the output's name links to the input
        inp = _inputs_folder(dataset, tmp_path)
        out = tmp_path / "out"
        out.mkdir()
        target = out / f"{stem}_tweakregstep.asdf"
        if case == "hard_link":
            os.link(inp / WFI01, target)
            how = r"by device and inode \(a hard link\)"
        else:
            target.symlink_to(inp / WFI01)
            how = "once symbolic links are resolved"
        return (inp / WFI01, {"output_dir": str(out)}, WFI01, how)
    if case == "report":
        inp = _inputs_folder(dataset, tmp_path)
        asn = _members_asn(inp, [WFI01])
        return (asn, {"output_dir": str(inp), "save_results": False, "report": asn.name},
                asn.name, r"the report, named by report='asn\.json'")
    if case == "save_abs_catalog":  # fit_gaia_ref.ecsv is the catfile
        inp = _inputs_folder(dataset, tmp_path)
        (inp / "fit_gaia_ref.ecsv").write_text(f"{WFI01}\n")
        return (inp / WFI01, {"output_dir": str(inp), "save_results": False,
                              "save_abs_catalog": True,
                              "catfile": str(inp / "fit_gaia_ref.ecsv")},
                "fit_gaia_ref.ecsv", "saved by save_abs_catalog")
    if case == "detected_catalog":  # the catalog detection would write is the catfile
        inp = _inputs_folder(dataset, tmp_path)
        name = f"{stem}_cat.ecsv"
        (inp / "cats").mkdir()
        (inp / "cats" / name).write_text(f"{WFI01}\n")
        return (inp / WFI01, {"save_results": False, "catalog_path": str(inp / "cats"),
                              "catfile": str(inp / "cats" / name)},
                name, r"the catalog detection would write for image 0 \(catalog_path=")
    if case == "catalog":  # suffix 'cat' names the output after the image's ASDF catalog
        inp = _inputs_folder(dataset, tmp_path)
        catalog = inp / f"{stem}_cat.asdf"
        table = Table.read(inp / "r0000101001001001001_0001_wfi01_cat.ecsv")
        asdf.AsdfFile({"catalog": table}).write_to(catalog)
        (inp / "catfile.txt").write_text(f"{WFI01} {catalog.name}\n")
        return (inp / WFI01, {"output_dir": str(inp), "suffix": "cat",
                              "catfile": str(inp / "catfile.txt"), "use_custom_catalogs": True},
                catalog.name, r"the catalog of image 0; the same path\); it is the model output")
    raise AssertionError(case)


@pytest.mark.parametrize("case", [
    "output_file_and_suffix", "suffix", "association_member", "association_product",
    "output_dir_link", "output_name_link", "hard_link", "report", "save_abs_catalog",
    "detected_catalog", "catalog",
])
def test_an_output_that_is_an_input_is_refused_before_work(dataset, tmp_path, case):
    """Whatever output_dir, output_file, suffix and the association say, no output may be
    an input file (same path, same file after symbolic links, same inode): refused
    before any work, naming the output, the input and the parameters that chose it."""
    data, kw, input_name, why = _overwrite_case(case, dataset, tmp_path)
    kw = {"save_results": True, "abs_refcat": str(tmp_path / "in" / "gaia.ecsv"),
          "processes": 1} | kw
    t = time.perf_counter()
    with bf.untouched(tmp_path / "in"), pytest.raises(OutputError, match=(
            rf"this output would overwrite the input .*{re.escape(input_name)} \(.*{why}.*"
            r"input files are never written: choose another output_dir, output_file or "
            r"suffix; nothing was aligned")) as info:
        TweakRegStep(**kw).run(data)
    assert time.perf_counter() - t < 10
    assert str(info.value).count("\n") == 0
    made = [p for p in tmp_path.rglob("*.asdf") if p.parent.name != "in" and not p.is_symlink()
            and p.stat().st_nlink == 1]  # anything but the inputs and the links the case made
    assert made == []


def test_a_library_saved_over_its_inputs_is_refused_at_save_time(dataset, tmp_path):
    """The check is made again with the final names when saving: a save_model call
    naming its outputs after the inputs (suffix 'cal' on files named '<x>.asdf') is
    refused before any file is written."""
    inp = _inputs_folder(dataset, tmp_path, names=("a.asdf", "a_cal.asdf"))
    step = TweakRegStep(abs_refcat=str(inp / "gaia.ecsv"), processes=1, output_dir=str(inp))
    library = step.run([str(inp / "a.asdf"), str(inp / "a_cal.asdf")])  # nothing saved
    assert sorted(p.name for p in inp.glob("*.asdf")) == ["a.asdf", "a_cal.asdf"]
    with bf.untouched(inp), pytest.raises(OutputError, match=(
            r"a_cal\.asdf: this output would overwrite the input .*a_cal\.asdf \(input model "
            r"1; the same path\); it is the model output of image 0")):
        step.save_model(library, suffix="cal", force=True)
    assert sorted(p.name for p in inp.glob("*.asdf")) == ["a.asdf", "a_cal.asdf"]


def test_long_input_names_are_refused_before_work(dataset, tmp_path):
    """240-byte input names: their outputs' names are legal for the file system (244 and
    253 bytes) but longer than a Roman file's meta.filename may be (120 characters):
    refused before the alignment, not when saving after it."""
    name = "r0000101001001001001_0001_wfi01_" + "x" * (240 - 41) + "_cal.asdf"
    assert len(name.encode()) == 240
    inp = _inputs_folder(dataset, tmp_path)
    shutil.copy(inp / WFI01, inp / name)
    t = time.perf_counter()
    with bf.untouched(inp), pytest.raises(OutputError, match=(
            r"x_cal_tweakregstep\.asdf: the output's name is 253 characters long, but a Roman "
            r"file's meta\.filename, which is set to its name, holds at most 120 \(roman_"
            r"datamodels' schema\); it is the model output of image 0, named from the input's "
            r"file name 'r0+.*x_cal\.asdf'.*give a shorter output_file \(or rename the "
            r"input\); nothing was aligned")):
        TweakRegStep.call(str(inp / name), abs_refcat=str(inp / "gaia.ecsv"), processes=1,
                          save_results=True, output_dir=str(tmp_path / "out"))
    assert time.perf_counter() - t < 10


def test_long_legal_output_names_are_written_through_short_temporaries(dataset, tmp_path):
    """A report named with 250 bytes, a table with 255: legal names, written; the hidden
    temporaries they are written through have names of bounded length."""
    from roman_tweakreg import _io

    prefix = _io.temp_prefix("." + "z" * 250)
    assert len(prefix.encode()) <= 120  # tempfile adds 8 random characters
    path = _io.write_atomically(tmp_path / ("t" * 251 + ".txt"), lambda p: p.write_text("ok"))
    assert path.read_text() == "ok"
    report = "r" * 245 + ".json"
    TweakRegStep.call(str(dataset[1]), **_step_kw(dataset, output_dir=str(tmp_path / "out"),
                                                  report=report))
    assert [p.name for p in (tmp_path / "out").iterdir()] == [report]
    assert json.loads((tmp_path / "out" / report).read_text())["statuses"]["cal_step"] == {
        "COMPLETE": 2}


def test_an_output_name_too_long_for_its_folder_is_refused_before_work(dataset, tmp_path):
    inp = _inputs_folder(dataset, tmp_path)
    long = "y" * 250
    t = time.perf_counter()
    with bf.untouched(inp), pytest.raises(OutputError, match=(
            rf"{long}yyyyy\.json: the output's name is 260 bytes long, longer than the 255 "
            r"bytes its folder .*out allows \(PC_NAME_MAX\); it is the report, named by "
            r"report='y+\.json', output_dir=.*: choose a shorter name; nothing was aligned")):
        TweakRegStep.call(str(inp / WFI01), abs_refcat=str(inp / "gaia.ecsv"), processes=1,
                          report=long + "yyyyy.json", output_dir=str(tmp_path / "out"))
    assert time.perf_counter() - t < 10
    long = "y" * 110  # the model's name: 128 characters, over meta.filename's 120
    with bf.untouched(inp), pytest.raises(OutputError, match=(
            rf"{long}_tweakregstep\.asdf: the output's name is 128 characters long.*at most "
            r"120.*named by output_dir=.*output_file='y+', suffix='tweakregstep'")):
        TweakRegStep.call(str(inp / WFI01), abs_refcat=str(inp / "gaia.ecsv"), processes=1,
                          output_file=long, output_dir=str(tmp_path / "out"))


# -- special files where a regular file is expected ---------------------------------------------
def _read_special(role: str, path: Path, dataset, tmp_path):
    """Read ``path`` as the step reads a file of ``role``."""
    from roman_tweakreg.refcat import check_refcat

    if role == "model":
        return open_library(str(path))
    if role == "association_member":
        shutil.copy(dataset[2][0], tmp_path / WFI01)
        return open_library(str(_members_asn(tmp_path, [WFI01, path.name])))
    if role == "association":
        return open_library(str(path))
    if role == "catfile":
        return read_catfile(path)
    if role == "catalog":
        return load_catalog(CatalogSource(str(path), "catfile test"), "img", None)
    if role == "abs_refcat_parameter":
        return check_refcat(str(path))
    if role == "abs_refcat_file":
        return read_local_catalog(path, RA, DEC, 0.1)
    raise AssertionError(role)


_ROLES = {  # role: (file name, error, what the message calls it)
    "model": ("m_cal.asdf", InvalidInputError, "association member file"),
    "association_member": ("m_cal.asdf", InvalidInputError, "association member file"),
    "association": ("asn.json", InvalidInputError, "association file"),
    "catfile": ("catfile.txt", CatalogError, "catfile"),
    "catalog": ("cat.ecsv", CatalogError, "catalog named by catfile test for img"),
    "abs_refcat_parameter": ("ref.ecsv", InvalidParameterError, None),
    "abs_refcat_file": ("ref.ecsv", ReferenceCatalogError,
                        "abs_refcat: the local reference catalog"),
}


@pytest.mark.parametrize(("role", "kind"), [
    (role, kind) for role in _ROLES for kind in bf.SPECIAL_KINDS
    if not (kind == "folder" and role.startswith("abs_refcat"))  # a HATS catalog there
])
def test_a_fifo_device_or_folder_where_a_file_is_expected(dataset, tmp_path, role, kind):
    """A FIFO without a writer, /dev/zero, /dev/null or a folder named where a file is
    expected: a clear error naming it and what it is, at once; never a hang, never
    'does not exist'."""
    name, error, what = _ROLES[role]
    path = bf.special_file(tmp_path, name, kind)
    words = re.escape(bf.SPECIAL_KINDS[kind])
    # a model given as a path is named by its real path (a link to /dev/zero: /dev/zero)
    named = re.escape(name) if role != "model" else rf"({re.escape(name)}|/dev/(zero|null))"
    if what is None:
        match = rf"Invalid 'abs_refcat' value: .*{named}.* is {words}, not a regular file"
    else:
        match = rf"{named}: {re.escape(what)} is {words}, not a regular file"
    t = time.perf_counter()
    with bf.deadline(5), pytest.raises(error, match=match) as info:
        _read_special(role, path, dataset, tmp_path)
    assert time.perf_counter() - t < 1
    assert "does not exist" not in str(info.value)


def test_a_cache_entry_replaced_by_a_fifo_is_deleted_and_fetched_again(tmp_path, body, caplog):
    cache, path = _cache_with_entry(tmp_path, body)
    path.unlink()
    os.mkfifo(path)
    with bf.deadline(5):
        assert cache.get(SVC, "GAIADR3", RA, DEC, 0.3, 2028.0) is None
    assert not os.path.lexists(path)
    assert "is a FIFO (named pipe), not a regular file; deleted, fetching again" in caplog.text
    assert cache.put(SVC, "GAIADR3", RA, DEC, 0.49, 2028.0, body) == path
    assert cache.get(SVC, "GAIADR3", RA, DEC, 0.3, 2028.0).body == body


def test_a_cached_file_replaced_by_a_fifo_is_fetched_again(tmp_path, caplog):
    cache = ConeCache(tmp_path / "cache")
    path = cache.file_path("http://127.0.0.1:9/ref.ecsv", "ref.ecsv")
    assert cache.put_file(path, b"ra,dec\n1,2\n") == path
    assert cache.get_file(path) == path
    path.unlink()
    os.mkfifo(path)
    with bf.deadline(5):
        assert cache.get_file(path) is None
    assert not os.path.lexists(path)
    assert "is a FIFO (named pipe), not a regular file" in caplog.text


# -- every format through the same hostile-content checks ----------------------------------------
def test_an_asdf_catalog_holding_a_yaml_bomb_is_refused_like_a_model(tmp_path):
    """The billion-laughs bomb that model files are refused for, in an ASDF catalog."""
    path = tmp_path / "cat.asdf"
    table = Table({"x": np.arange(5.0), "y": np.arange(5.0)})
    asdf.AsdfFile({"catalog": table, "meta": {"a": 1}}).write_to(path)
    assert len(read_catalog(CatalogSource(str(path), "catfile test"), "img")) == 5  # reads
    path.write_bytes(bf.yaml_bomb(path.read_bytes(), 9, 10, where=b"history:\n"))
    t = time.perf_counter()
    with bf.deadline(20), pytest.raises(CatalogError, match=(
            r"cat\.asdf: catalog of img has a YAML header whose anchors and aliases expand to more "
            r"than 1000000 nodes \(a YAML bomb\?\)")):
        _read(tmp_path, path)
    assert time.perf_counter() - t < 2


@pytest.mark.parametrize(("name", "fmt", "match"), [
    ("cat.ecsv", "ascii.ecsv", r"img: cannot read catalog .*cat\.ecsv as ascii\.ecsv: not a "
                               r"text table \(ascii\.ecsv\): its first 1024 bytes hold NUL bytes"),
    ("cat.csv", "ascii.csv", r"not a text table \(ascii\.csv\)"),
    ("cat.txt", "ascii.commented_header", r"not a text table \(ascii\.commented_header\)"),
    ("cat.parquet", "ascii.ecsv", r"not a Parquet file: expected it to start and end with "
                                  r"b'PAR1'"),
    ("cat.fits", "fits", r"not a FITS file: expected it to start with 'SIMPLE'"),
    ("cat.asdf", "ascii.ecsv", r"cat\.asdf: catalog of img is not an ASDF file"),
])
def test_a_2gb_catalog_of_nul_bytes_is_refused_at_once(tmp_path, name, fmt, match):
    """A 2 GB sparse file of NUL bytes as a catalog: refused from its first bytes, in well
    under a second and without reading it (before: 33 s and 4.4 GB of memory)."""
    import tracemalloc

    path = bf.sparse_file(tmp_path / name)
    tracemalloc.start()
    t = time.perf_counter()
    try:
        with bf.deadline(20), pytest.raises(CatalogError, match=match):
            load_catalog(CatalogSource(str(path), "catfile test"), "img", None, fmt)
        elapsed, peak = time.perf_counter() - t, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 0.5
    assert peak < 16 * 2**20
    assert path.stat().st_size == 2 * 1024**3


@pytest.mark.parametrize("name", ["ref.ecsv", "ref.csv", "ref.parquet", "ref.fits"])
def test_a_2gb_reference_catalog_of_nul_bytes_is_refused_at_once(tmp_path, name):
    path = bf.sparse_file(tmp_path / name)
    t = time.perf_counter()
    with bf.deadline(20), pytest.raises(ReferenceCatalogError, match=(
            rf"abs_refcat: cannot read .*{re.escape(name)}: not a (text table|Parquet file|"
            r"FITS file)")):
        read_local_catalog(path, RA, DEC, 0.1)
    assert time.perf_counter() - t < 0.5
# -- wrong answers once marked COMPLETE (issue 28) ----------------------------------------------
@pytest.fixture(scope="module")
def refcat_2028(tmp_path_factory):
    from conftest import refcat_at

    _, stars = make_data()
    path = tmp_path_factory.mktemp("ref") / "gaia_2028.ecsv"
    refcat_at(stars, 2028.0).write(path)
    return str(path)


def _align_damaged(refcat, damage):
    """Align make_data()'s six images after ``damage(models)``; statuses, reasons, errors, and
    how far each output WCS is from its input (mas)."""
    import copy

    from conftest import models_of, truths_of
    from test_step import errors_mas, metas

    exposures, _ = make_data()
    models = models_of(exposures)
    damage(models)
    inputs = [copy.deepcopy(m.meta.wcs) for m in models]
    result = TweakRegStep.call(models, abs_refcat=refcat)
    out = metas(result)
    moved = [simulate.wcs_difference_mas(m.meta.wcs, w) for m, w in zip(models, inputs,
                                                                         strict=True)]
    return ([o[0] for o in out], [o[1].get("reason", "") for o in out],
            errors_mas(result, truths_of(exposures)), moved)


def test_wcs_of_another_detector_is_refused_with_the_reason(refcat_2028):
    import copy

    def swap(models):  # WFI10's WCS in WFI01's file: was COMPLETE and 489" wrong
        models[0].meta.wcs = copy.deepcopy(models[2].meta.wcs)

    status, reason, errors, moved = _align_damaged(refcat_2028, swap)
    assert status == ["SKIPPED"] + ["COMPLETE"] * 5
    assert re.fullmatch(
        r"its WCS is not of detector WFI01 \(named by meta\.instrument\.detector and "
        r"meta\.wcsinfo\.aperture_name WFI01_FULL\): it puts the reference pixel \(2043\.5, "
        r"2043\.5\) at v2v3 \(1557\.\d, -617\.\d\) arcsec, 489 arcsec from WFI01's reference "
        r"point in the SIAF \(1312\.9, -1040\.8\), more than 5 arcsec; that is WFI10's reference "
        r"point \(0\.0 arcsec away\): the WCS is WFI10's", reason[0])
    assert moved[0] == 0.0  # the refused image keeps its WCS
    assert errors[1:].max() < 1.0  # the others are right


def test_aperture_of_another_detector_is_refused(refcat_2028):
    def rename(models):
        models[1].meta.wcsinfo.aperture_name = "WFI10_FULL"

    status, reason, errors, moved = _align_damaged(refcat_2028, rename)
    assert status == ["COMPLETE", "SKIPPED"] + ["COMPLETE"] * 4
    assert reason[1] == ("meta.instrument.detector is WFI02 but meta.wcsinfo.aperture_name is "
                         "WFI10_FULL (detector WFI10): the file mixes two detectors")
    assert moved[1] == 0.0
    assert np.delete(errors, 1).max() < 1.0


@pytest.mark.parametrize(("year", "carried"), [(2200, 184), (9999, 7983), (1990, 26)])
def test_exposure_epoch_outside_the_mission_is_refused(refcat_2028, year, carried):
    import warnings

    import erfa
    from astropy.time import Time

    def date(models):  # 2200: the catalog was carried 184 years and a 700 mas fit accepted
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", erfa.ErfaWarning)  # "dubious year": on purpose
            start = Time(f"{year}-01-01T00:00:00", scale="utc")
        for model in models[:3]:
            model.meta.exposure.start_time = start

    status, reason, errors, moved = _align_damaged(refcat_2028, date)
    assert status == ["SKIPPED"] * 3 + ["COMPLETE"] * 3
    assert reason[0] == (
        f"meta.exposure.start_time {year}-01-01T00:00:00.000 (epoch {year}.00) is outside the "
        f"epochs of Roman observations accepted, 2000 to 2050: the reference catalog would be "
        f"carried {carried} years from Gaia's 2016.0")
    assert moved[:3] == [0.0] * 3
    assert errors[3:].max() < 1.0


@pytest.mark.parametrize("bad", [0, 5])
def test_one_catalog_with_every_x_infinite_costs_the_others_nothing(refcat_2028, bad):
    def infinite(models):
        models[bad].meta["tweakreg_catalog"]["x"] = np.inf

    status, reason, errors, moved = _align_damaged(refcat_2028, infinite)
    assert status == ["SKIPPED" if i == bad else "COMPLETE" for i in range(6)]
    assert reason[bad] == "empty source catalog"
    assert moved[bad] == 0.0
    # issue 28 saw the others 598 mas off; not reproduced here (in memory, files, the service)
    assert np.delete(errors, bad).max() < 1.0


def test_a_thousand_processes_are_capped_at_the_usable_cores(dataset, caplog):
    # issue 28: processes=1000 started a thousand workers on a 2-core machine
    from roman_tweakreg._parallel import usable_cores

    with bf.untouched(dataset[0]), caplog.at_level("INFO", logger="roman_tweakreg"):
        result = TweakRegStep.call(str(dataset[1]), **_step_kw(dataset, processes=1000))
    assert f"processes=1000 capped at the {usable_cores()} usable cores" in caplog.text
    from test_step import metas

    assert [m[0] for m in metas(result)] == ["COMPLETE", "COMPLETE"]
