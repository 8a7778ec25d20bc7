"""Which catalog each image uses (the truth table of docs/catalogs.rst) and bad input."""

import json
import pickle

import numpy as np
import pytest
from astropy.table import Table

from conftest import make_data
from roman_tweakreg import CatalogError, MissingCatalogError, TweakRegStep
from roman_tweakreg.catalogs import collect, normalize_catalog, read_catfile
from roman_tweakreg.detection import DetectionParameters
from roman_tweakreg.library import open_library

DETECT = DetectionParameters(bkg_boxsize=16)


def _cat(n, seed):
    rng = np.random.default_rng(seed)
    return Table({"x": rng.uniform(0, 4000, n), "y": rng.uniform(0, 4000, n)})


@pytest.fixture
def field(tmp_path):
    """One exposure, two detectors on disk; catalogs with 11 (meta), 22 (asn), 33 (catfile) rows."""
    exposures, _ = make_data(1, detectors=("WFI01", "WFI02"), data_shape=(32, 32))
    names = []
    for model in exposures[0].models:
        root = model.meta.filename.removesuffix(".asdf")
        _cat(11, 1).write(tmp_path / f"{root}_meta.ecsv")
        _cat(22, 2).write(tmp_path / f"{root}_asn.ecsv")
        (tmp_path / "cats").mkdir(exist_ok=True)
        _cat(33, 3).write(tmp_path / "cats" / f"{root}_catfile.ecsv")
        model.meta["tweakreg_catalog"] = f"{root}_meta.ecsv"
        model.save(tmp_path / model.meta.filename)
        names.append(model.meta.filename)
    return tmp_path, names


def _asn(folder, names, attrs):
    members = [{"expname": n, "exptype": "science", **attrs.get(n, {})} for n in names]
    path = folder / "asn.json"
    path.write_text(json.dumps({"products": [{"name": "x", "members": members}]}))
    return path


def _catfile(folder, lines):
    path = folder / "cats" / "catfile.txt"
    path.write_text("# model catalog\n\n" + "\n".join(lines) + "\n")
    return path


def _used(folder, asn, **kwargs):
    plane, skipped, workers = collect(
        open_library(asn), detection=DETECT, catalog_path=str(folder / "detected"), **kwargs
    )
    workers.close()
    images = plane.images
    used = {i.name: len(i.catalog) for i in images}
    used.update({f"skipped {i}": r for i, r in skipped.items()})
    return used, {i.name: i.catalog_name for i in images}


@pytest.mark.parametrize(
    ("use_custom", "with_catfile", "asn_attr", "meta", "expected"),
    [
        (False, True, "asn", True, 11),  # not custom: catfile and asn ignored, meta used
        (False, False, None, False, "detect"),
        (True, True, "asn", True, 33),  # catfile wins over association and meta
        (True, True, "", True, 33),
        (True, False, "asn", True, 22),  # association attribute over meta
        (True, False, "", True, "detect"),  # "" -> no catalog -> detection
        (True, False, None, True, 11),  # no attribute -> the model's own
        (True, False, None, False, "detect"),
    ],
)
def test_catalog_precedence(field, use_custom, with_catfile, asn_attr, meta, expected):
    folder, names = field
    attrs = {}
    if asn_attr is not None:
        attrs = {
            n: {"tweakreg_catalog": (f"{n.removesuffix('.asdf')}_asn.ecsv" if asn_attr else "")}
            for n in names
        }
    asn = _asn(folder, names, attrs)
    catfile = ""
    if with_catfile:
        catfile = str(
            _catfile(folder, [f"{n} {n.removesuffix('.asdf')}_catfile.ecsv" for n in names])
        )
    if not meta:
        for n in names:
            (folder / f"{n.removesuffix('.asdf')}_meta.ecsv").unlink()
            import roman_datamodels.datamodels as rdm

            (folder / "tmp").mkdir(exist_ok=True)
            with rdm.open(folder / n) as m:
                del m.meta["tweakreg_catalog"]
                m.save(folder / "tmp" / n)
            (folder / "tmp" / n).replace(folder / n)
    used, assigned = _used(folder, asn, use_custom_catalogs=use_custom, catfile=catfile)
    if expected == "detect":
        # blank 32x32 images: detection runs, writes an (empty) catalog, the image is skipped
        assert used == {"skipped 0": "empty source catalog", "skipped 1": "empty source catalog"}
        for n in names:
            assert (folder / "detected" / f"{n.removesuffix('.asdf')}_cat.ecsv").is_file()
    else:
        assert used == dict.fromkeys(names, expected)
        if expected == 33:
            assert all(
                a.endswith("_catfile.ecsv") and a.startswith(str(folder)) for a in assigned.values()
            )
        if expected == 11:
            assert set(assigned.values()) == {""}


def test_catfile_line_without_catalog_and_unlisted_model(field):
    folder, names = field
    asn = _asn(folder, names, {})
    catfile = _catfile(folder, [f"{names[0]}", "other_cal.asdf other_cat.ecsv"])
    used, _ = _used(folder, asn, use_custom_catalogs=True, catfile=str(catfile))
    # first model: "no catalog" -> detection (blank image -> skipped); second: its own meta (11)
    assert used == {names[1]: 11, "skipped 0": "empty source catalog"}


def test_catfile_naming_unknown_model_warns(field, caplog):
    folder, names = field
    catfile = _catfile(
        folder,
        [f"{n} {n.removesuffix('.asdf')}_catfile.ecsv" for n in names]
        + ["ghost_cal.asdf ghost.ecsv"],
    )
    _used(folder, _asn(folder, names, {}), use_custom_catalogs=True, catfile=str(catfile))
    assert "names ghost_cal.asdf, which is not among the inputs" in caplog.text


def test_use_custom_without_any_custom_catalog_warns(field, caplog):
    folder, names = field
    used, _ = _used(folder, _asn(folder, names, {}), use_custom_catalogs=True)
    assert used == dict.fromkeys(names, 11)
    assert "no catfile and no association member has a tweakreg_catalog" in caplog.text


def test_bad_catfile_line_names_line(field):
    folder, _ = field
    path = _catfile(folder, ["a_cal.asdf a_cat.ecsv extra"])
    with pytest.raises(
        CatalogError,
        match=r"catfile .* line 3: expected '<model file> "
        r"\[<catalog file>\]', found 3 columns",
    ):
        read_catfile(path)


def test_missing_catfile(tmp_path):
    with pytest.raises(MissingCatalogError, match=r"catfile .*nope.txt does not exist"):
        read_catfile(tmp_path / "nope.txt")


def test_missing_catalog_names_model_and_paths(field):
    folder, names = field
    asn = _asn(folder, names, {names[0]: {"tweakreg_catalog": "gone.ecsv"}})
    with pytest.raises(
        MissingCatalogError,
        match=rf"{names[0]}: catalog named by association "
        r"member attribute tweakreg_catalog does not "
        r"exist; tried .*gone.ecsv",
    ):
        _used(folder, asn, use_custom_catalogs=True)


def test_catalog_without_pixel_columns_lists_columns():
    with pytest.raises(
        CatalogError,
        match=r"img: 'tweakreg' source catalogs must contain a pair of pixel columns "
        r"\(x/y, x_psf/y_psf, xcentroid/ycentroid, x_centroid/y_centroid\): catalog has no "
        r"pixel columns; found \['ra', 'dec'\]",
    ):
        normalize_catalog(Table({"ra": [1.0], "dec": [2.0]}), "img")


def test_psf_positions_preferred_over_centroids():
    rng = np.random.default_rng(11)
    cat = Table({"x_centroid": rng.uniform(0, 100, 5), "y_centroid": rng.uniform(0, 100, 5)})
    cat["x_psf"], cat["y_psf"] = cat["x_centroid"] + 0.25, cat["y_centroid"] - 0.25
    out = normalize_catalog(cat, "img")
    np.testing.assert_array_equal(out["x"], cat["x_psf"])
    np.testing.assert_array_equal(out["y"], cat["y_psf"])
    cat["x"], cat["y"] = cat["x_psf"] + 1.0, cat["y_psf"] + 1.0  # plain x/y still come first
    np.testing.assert_array_equal(normalize_catalog(cat, "img")["x"], cat["x"])


def test_member_catalog_ignored_without_use_custom_warns(field, caplog):
    folder, names = field
    attrs = {n: {"tweakreg_catalog": f"{n.removesuffix('.asdf')}_asn.ecsv"} for n in names}
    used, _ = _used(folder, _asn(folder, names, attrs))
    assert used == dict.fromkeys(names, 11)  # the model's own catalog
    assert (
        f"{names[0]}: association member attribute tweakreg_catalog='{names[0][:-5]}_asn.ecsv' "
        "ignored because use_custom_catalogs is False; run with use_custom_catalogs=True"
    ) in caplog.text


@pytest.mark.parametrize("suffix", [".parquet", ".ecsv"])
def test_update_catalog_file_keeps_everything_but_sky_columns(tmp_path, suffix):
    import astropy.units as u
    import pyarrow.parquet as pq

    from roman_tweakreg._io import read_parquet
    from roman_tweakreg.catalogs import update_catalog_file
    from roman_tweakreg.testing import simulate

    wcsinfo = {"v2_ref": 0.0, "v3_ref": 0.0, "roll_ref": 0.0, "ra_ref": 10.0, "dec_ref": 20.0}
    wcs = simulate.detector_wcs("WFI01", wcsinfo)
    rng = np.random.default_rng(5)
    cat = Table({"label": np.arange(1, 9, dtype=np.int32)})
    cat["x_centroid"], cat["y_centroid"] = rng.uniform(0, 4000, (2, 8))
    cat["x_psf"], cat["y_psf"] = cat["x_centroid"] + 0.5, cat["y_centroid"] + 0.5
    for name in ("ra_centroid", "dec_centroid", "ra_psf", "dec_psf", "ra", "dec"):
        cat[name] = np.zeros(8) * u.deg
    cat["flux"] = rng.uniform(1, 2, 8) * u.nJy
    path = tmp_path / f"cat{suffix}"
    cat.write(path)
    before = pq.read_schema(path).metadata if suffix == ".parquet" else None
    updated = update_catalog_file(path, wcs)
    assert updated == ["ra_centroid", "dec_centroid", "ra", "dec", "ra_psf", "dec_psf"]
    # astropy reads Parquet only with pandas: pyarrow here, units in the schema metadata
    after = read_parquet(path) if suffix == ".parquet" else Table.read(path)
    ra, dec = wcs(cat["x_psf"], cat["y_psf"])
    np.testing.assert_array_equal(after["ra_psf"], ra)
    np.testing.assert_array_equal(after["dec_psf"], dec)
    ra, dec = wcs(cat["x_centroid"], cat["y_centroid"])
    np.testing.assert_array_equal(after["ra"], ra)
    np.testing.assert_array_equal(after["dec_centroid"], dec)
    assert after.colnames == cat.colnames
    for name in ("label", "x_centroid", "y_psf", "flux"):
        np.testing.assert_array_equal(np.asarray(after[name]), np.asarray(cat[name]))
    assert after["label"].dtype == np.int32
    if suffix == ".parquet":
        assert pq.read_schema(path).metadata == before
    else:
        assert (after["ra"].unit, after["flux"].unit) == (u.deg, u.nJy)
    assert list(tmp_path.iterdir()) == [path]  # written atomically, nothing left behind


def test_non_finite_rows_dropped_and_counted(field, caplog):
    folder, names = field
    cat = _cat(11, 1)
    cat["x"][:4] = np.nan
    cat.write(folder / f"{names[0].removesuffix('.asdf')}_meta.ecsv", overwrite=True)
    used, _ = _used(folder, _asn(folder, names, {}))
    assert used[names[0]] == 7
    assert "dropped 4 catalog rows with non-finite x/y" in caplog.text


def test_empty_catalog_skips_only_that_image(tmp_path):
    exposures, _stars = make_data(2, detectors=("WFI01",))
    models = [m for e in exposures for m in e.models]
    models[0].meta["tweakreg_catalog"] = models[0].meta["tweakreg_catalog"][:0]
    result = TweakRegStep.call(models, abs_refcat="", abs_refcat_retries=0)
    with result:
        statuses = []
        for i, m in enumerate(result):
            statuses.append((m.meta.cal_step.tweakreg, m.meta.wcs_fit_results.get("reason", "")))
            result.shelve(m, i, modify=False)
    assert statuses[0] == ("SKIPPED", "empty source catalog")
    # one group left and no reference catalog reachable: nothing to align it to
    assert statuses[1][0] == "SKIPPED"


def test_catfile_end_to_end_sets_meta(tmp_path):
    exposures, _stars = make_data(2, detectors=("WFI01",))
    models = [m for e in exposures for m in e.models]
    lines = []
    for m in models:
        name = m.meta.filename.replace(".asdf", "_user.ecsv")
        m.meta["tweakreg_catalog"].write(tmp_path / name)
        lines.append(f"{m.meta.filename} {name}")
        m.meta["tweakreg_catalog"] = None
    (tmp_path / "catfile.txt").write_text("\n".join(lines))
    result = TweakRegStep.call(
        models,
        use_custom_catalogs=True,
        catfile=str(tmp_path / "catfile.txt"),
        abs_refcat="",
        abs_refcat_retries=0,
    )
    with result:
        for i, m in enumerate(result):
            assert m.meta["tweakreg_catalog"] == str(tmp_path / lines[i].split()[1])
            assert m.meta.source_catalog.tweakreg_catalog_name == m.meta["tweakreg_catalog"]
            # relative alignment only (no catalog service here): INCOMPLETE (issue 27)
            assert m.meta.cal_step.tweakreg == "INCOMPLETE"
            result.shelve(m, i, modify=False)


@pytest.mark.parametrize(
    ("fmt", "name"),
    [
        ("ascii.ecsv", "a_cal_cat.ecsv"),
        ("ascii.csv", "a_cal_cat.csv"),
        ("ascii.commented_header", "a_cal_cat.txt"),
        ("fits", "a_cal_cat.fits"),
        ("parquet", "a_cal_cat.parquet"),
        ("votable", "a_cal_cat.votable"),
    ],
)
def test_one_format_table_names_written_catalogs_and_reads_them_back(fmt, name):
    from roman_tweakreg._io import table_format
    from roman_tweakreg.detection import catalog_filename

    path = catalog_filename("a_cal.asdf", "cats", fmt)
    assert path.as_posix() == f"cats/{name}"
    # what is written under a known ending is read back as the same format
    read_back = table_format(path)
    assert read_back == (fmt if fmt in ("ascii.ecsv", "ascii.csv", "fits", "parquet") else None)


def test_the_library_builds_its_read_only_association_once(field):
    """stpipe's ``asn`` copies the whole association on each access (quadratic over the
    members); the library's is built once, equal to stpipe's and as read-only."""
    from stpipe.library import AbstractModelLibrary

    folder, names = field
    library = open_library(_asn(folder, names, {}))
    view = library.asn
    assert library.asn is view
    assert view == AbstractModelLibrary.asn.fget(library)
    assert [m["expname"] for m in view["products"][0]["members"]] == names
    with pytest.raises(TypeError):
        view["products"][0]["members"][0]["expname"] = "other.asdf"


def test_the_association_is_read_once_whatever_the_library(field, monkeypatch):
    """A library whose ``asn`` copies the whole association on each access (stpipe's,
    as romancal's ``ModelLibrary`` has it) is read once per run, not once per member:
    the cost stays linear in the members; every image still gets its own catalog."""
    from stpipe.library import AbstractModelLibrary

    from roman_tweakreg.catalogs import plan_catalogs

    folder, names = field
    attrs = {n: {"tweakreg_catalog": n.removesuffix(".asdf") + "_asn.ecsv"} for n in names}
    library = open_library(_asn(folder, names, attrs))
    reads = []

    def stpipe_asn(self):
        reads.append(1)
        return AbstractModelLibrary.asn.fget(self)

    monkeypatch.setattr(type(library), "asn", property(stpipe_asn))
    found = plan_catalogs(library, use_custom_catalogs=True).images
    assert len(reads) == 1
    assert [p.image.name for p in found] == names
    assert [len(Table.read(p.source.resolve())) for p in found] == [22, 22]


def test_the_plan_of_a_mixed_association_names_each_catalog_and_reads_nothing(field):
    """plan -> detect -> read: the plan says which image is detected (and where its
    catalog goes) and which uses a custom catalog; making it reads and writes no catalog;
    reading it then detects, writes and reads as the step does."""
    from roman_tweakreg.catalogs import CatalogPlan, plan_catalogs, read_catalogs

    folder, names = field
    asn = _asn(folder, names, {})
    custom = folder / "cats" / f"{names[1].removesuffix('.asdf')}_catfile.ecsv"
    catfile = _catfile(folder, [names[0], f"{names[1]} {custom.name}"])
    detected = folder / "detected" / f"{names[0].removesuffix('.asdf')}_cat.ecsv"
    plan = plan_catalogs(
        open_library(asn), use_custom_catalogs=True, catfile=str(catfile), detection=DETECT,
        catalog_path=str(folder / "detected"),
    )  # fmt: skip
    assert isinstance(plan, CatalogPlan)
    assert (plan.n_images, plan.skipped) == (2, {})
    first, second = plan.images
    assert [first.image.name, second.image.name] == names
    # image 0: its catfile line names no catalog -> detected, into catalog_path
    assert first.detection is not None
    assert (first.detection.image_file, first.detection.catalog_file) == (
        str(folder / names[0]), detected
    )
    assert (first.source.value, first.source.origin) == (str(detected), "detection")
    assert first.image.catalog_name == str(detected)
    assert first.image.catalog_file == ""  # the step's own output, not an input
    # image 1: the catalog its catfile line names (33 rows), found next to the catfile
    assert second.detection is None
    assert second.source.resolve() == custom
    assert (second.image.catalog_name, second.image.catalog_file) == (str(custom), str(custom))
    assert plan.detections == (first.detection,)
    copy = pickle.loads(pickle.dumps(plan))  # a plan travels to another process whole
    assert copy.detections == plan.detections
    assert [p.source for p in copy.images] == [first.source, second.source]
    assert first.image.catalog is None  # nothing read or written
    assert not detected.exists()
    # the caller ran the detections: every catalog is then read from its file
    assert plan.detected().detections == ()
    assert plan.detected().images[0].source == first.source
    # read: the detection runs (blank image: an empty catalog, written), the catfile's is read
    plane, skipped, workers = read_catalogs(plan)
    workers.close()
    assert detected.is_file()
    assert skipped == {0: "empty source catalog"}
    assert [(i.name, len(i.catalog)) for i in plane.images] == [(names[1], 33)]
    assert plan.images[1].image.catalog is None  # the plan is not changed by reading it


def test_the_step_given_a_planned_library_reads_as_planned_without_choosing(
    tmp_path, monkeypatch
):
    """A plan made with use_custom_catalogs=True, given to a step whose own rule would
    take image 0's meta catalog: the step reads the plan's catalogs, opens nothing, and
    aligns every image as the step alone does with the planning parameters."""
    from roman_tweakreg import step as step_module
    from roman_tweakreg.catalogs import PlannedLibrary
    from roman_tweakreg.testing.pixels import write_pixel_association

    asn = write_pixel_association(tmp_path / "px", shape=(256, 256), keep_catalog=1)
    names = [m["expname"] for m in json.loads(asn.read_text())["products"][0]["members"]]
    own = asn.parent / (names[0].removesuffix("_cal.asdf") + "_own.ecsv")
    (tmp_path / "mine").mkdir()
    mine = tmp_path / "mine" / own.name
    mine.write_bytes(own.read_bytes())
    catfile = tmp_path / "cats.txt"
    catfile.write_text(f"{names[0]} {mine}\n")
    gaia = str(asn.parent / "gaia.ecsv")
    planner = TweakRegStep(use_custom_catalogs=True, catfile=str(catfile),
                           catalog_path=str(tmp_path / "cats"), abs_refcat=gaia)  # fmt: skip
    (tmp_path / "cats").mkdir()
    plan = planner.plan_catalogs(open_library(asn))
    assert [j.image for j in plan.detections] == names[1:]
    for job in plan.detections:  # the caller detects (the batch: Dask tasks)
        job.run()
    opened = []
    monkeypatch.setattr(step_module, "open_library", lambda *a, **k: opened.append(a))
    library = open_library(asn)
    result = TweakRegStep.call(
        PlannedLibrary(library, plan.detected(), str(asn)), abs_refcat=gaia, processes=1
    )
    assert opened == []
    assert result is library
    with result:
        models = [result.borrow(i) for i in range(len(result))]
        used = [m.meta.get("tweakreg_catalog") for m in models]
        statuses = [str(m.meta.cal_step.tweakreg) for m in models]
        nmatches = [int(m.meta.wcs_fit_results["absolute"]["nmatches"]) for m in models]
        for i, m in enumerate(models):
            result.shelve(m, i, modify=False)
    # image 0: the plan's catfile catalog (the step's own rule would take its meta one)
    assert used == [str(mine), *(str(tmp_path / "cats" / f"{n[:-5]}_cat.ecsv") for n in names[1:])]
    assert statuses == ["COMPLETE"] * 4
    assert min(nmatches) >= 60
