"""asdf settings around reads and writes: outputs validated, inputs read in the thread's
own configuration, and a model written in a worker process the same as here."""

from __future__ import annotations

import threading

import asdf
import pytest
from asdf.exceptions import ValidationError

from conftest import make_data, models_of
from roman_tweakreg.library import open_library
from roman_tweakreg.outputs import _Portable, _save


@pytest.fixture(scope="module")
def models():
    exposures, _ = make_data(n_exposures=1, detectors=("WFI01", "WFI02", "WFI03"))
    return models_of(exposures)


def _tree(path):
    """A written file's tree, without its name and the date that changes with every write."""
    with asdf.open(path, lazy_load=False, memmap=False) as af:
        tree = af.tree["roman"]
        tree["meta"]["file_date"] = tree["meta"]["filename"] = None
        return repr(tree)


def test_outputs_are_validated_and_a_failed_validation_leaves_nothing_behind(models, tmp_path):
    model = models[1].copy()
    _save(models[0], tmp_path / "good.asdf")
    model.meta.exposure.start_time = "yesterday"  # a referenced schema wants a Time
    with pytest.raises(ValidationError, match="yesterday"):
        _save(model, tmp_path / "bad.asdf")
    model.meta.exposure.start_time = models[1].meta.exposure.start_time
    model.meta.instrument.detector = "WFI99"  # an enum of a referenced schema
    with pytest.raises(ValidationError, match="WFI99"):
        _save(model, tmp_path / "bad.asdf")
    _save(models[2], tmp_path / "after.asdf")
    _save(models[2], tmp_path / "again.asdf")
    assert _tree(tmp_path / "after.asdf") == _tree(tmp_path / "again.asdf")


def _bytes(path) -> bytes:
    """A file's bytes but its name and date (which differ between two writes)."""
    lines = path.read_bytes().split(b"\n")
    return b"\n".join(x for x in lines if b"file_date:" not in x and b"filename:" not in x)


@pytest.mark.parametrize("where", ["memory", "file"])
def test_a_model_sent_to_a_worker_writes_the_same_file(models, tmp_path, where):
    """What a worker process receives (``_Portable``, pickled) writes the same bytes,
    but for the file name and date, for a model in memory and one read from a file
    (whose nodes asdf reads lazily)."""
    import pickle

    if where == "file":
        files = []
        for i, model in enumerate(models):
            files.append(str(tmp_path / f"in{i}_cal.asdf"))
            model.copy().save(files[-1])
        library = open_library(files)
        with library:
            models = [library.borrow(i) for i in range(len(library))]
            for i, model in enumerate(models):
                library.shelve(model, i, modify=False)
    for i, model in enumerate(models):
        sent = pickle.loads(pickle.dumps(_Portable(model)))
        assert type(sent.model) is type(model)
        _save(model, tmp_path / f"here{i}.asdf")
        _save(sent.model, tmp_path / f"sent{i}.asdf")
        assert _tree(tmp_path / f"here{i}.asdf") == _tree(tmp_path / f"sent{i}.asdf")
        here = _bytes(tmp_path / f"here{i}.asdf")
        assert len(here) > 10_000
        assert here == _bytes(tmp_path / f"sent{i}.asdf")


def test_inputs_are_read_without_changing_asdf_s_configuration(models, tmp_path):
    """Models opened in several threads at once while another thread reads asdf's
    configuration: ``validate_on_read`` is never seen changed outside the opens, and
    the global configuration object is the same after."""
    files = []
    for i, model in enumerate(models):
        files.append(tmp_path / f"in{i}_cal.asdf")
        model.copy().save(files[-1])
    config = asdf.get_config()
    before = (config.validate_on_read, repr(config))
    seen, stop = set(), threading.Event()

    def watch():
        while not stop.is_set():
            seen.add(asdf.get_config().validate_on_read)

    def open_all():
        library = open_library([str(f) for f in files])
        with library:
            for index in range(len(library)):
                model = library.borrow(index)
                assert model.meta.filename
                library.shelve(model, index, modify=False)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        threads = [threading.Thread(target=open_all) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        stop.set()
        watcher.join()
    assert seen == {before[0]}
    assert asdf.get_config() is config
    assert (config.validate_on_read, repr(config)) == before
