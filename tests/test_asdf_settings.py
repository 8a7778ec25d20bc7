"""asdf settings changed around reads and writes: what they save, and their restoring."""

from __future__ import annotations

import threading

import asdf
import asdf.schema
import pytest
import yaml
from asdf.exceptions import ValidationError

from conftest import make_data, models_of
from roman_tweakreg._asdf_settings import no_validation_on_read, schemas_parsed_once
from roman_tweakreg.outputs import _save


@pytest.fixture(scope="module")
def models():
    exposures, _ = make_data(n_exposures=1, detectors=("WFI01", "WFI02", "WFI03"))
    return models_of(exposures)


@pytest.fixture
def yaml_parses(monkeypatch):
    """Count asdf's YAML parses of schema files (its loader calls ``yaml.load``)."""
    count = [0]
    load = yaml.load

    def counting(*args, **kwargs):
        count[0] += 1
        return load(*args, **kwargs)

    monkeypatch.setattr(asdf.schema.yaml, "load", counting)
    return count


def _tree(path):
    """A written file's tree, without its name and the date that changes with every write."""
    with asdf.open(path, lazy_load=False, memmap=False) as af:
        tree = af.tree["roman"]
        tree["meta"]["file_date"] = tree["meta"]["filename"] = None
        return repr(tree)


def test_schemas_parsed_once_saves_parses_writes_same_files(models, tmp_path, yaml_parses):
    _save(models[0], tmp_path / "warm.asdf")  # asdf's one-time loading out of the count
    parses = []
    for i, m in enumerate(models):
        before = yaml_parses[0]
        _save(m, tmp_path / f"plain{i}.asdf")
        parses.append(yaml_parses[0] - before)
    assert min(parses) >= 20  # every file parses the referenced schemas again
    once = []
    with schemas_parsed_once():
        for i, m in enumerate(models):
            before = yaml_parses[0]
            _save(m, tmp_path / f"once{i}.asdf")
            once.append(yaml_parses[0] - before)
    assert 0 < once[0] <= parses[0]  # the first file parses them (each once) ...
    assert once[1:] == [0, 0]  # ... the next ones do not
    for i in range(len(models)):
        assert _tree(tmp_path / f"once{i}.asdf") == _tree(tmp_path / f"plain{i}.asdf")


def test_schemas_parsed_once_still_validates(models, tmp_path):
    model = models[1].copy()
    with schemas_parsed_once():
        _save(models[0], tmp_path / "good.asdf")  # the referenced schemas are now kept
        model.meta.exposure.start_time = "yesterday"  # a referenced schema wants a Time
        with pytest.raises(ValidationError, match="yesterday"):
            _save(model, tmp_path / "bad.asdf")
        model.meta.exposure.start_time = models[1].meta.exposure.start_time
        model.meta.instrument.detector = "WFI99"  # an enum of a referenced schema
        with pytest.raises(ValidationError, match="WFI99"):
            _save(model, tmp_path / "bad.asdf")
        # a failed validation leaves nothing behind for the next file of the same hold
        _save(models[2], tmp_path / "after.asdf")
    _save(models[2], tmp_path / "plain.asdf")
    assert _tree(tmp_path / "after.asdf") == _tree(tmp_path / "plain.asdf")


def test_settings_restored_after_last_holder_in_any_order():
    loader = asdf.schema._make_schema_loader
    resolver = asdf.schema._make_jsonschema_refresolver
    config = asdf.get_config()
    validate_on_read = config.validate_on_read
    entered, leave = [threading.Event() for _ in range(3)], [threading.Event() for _ in range(3)]
    seen = []

    def hold(i):
        with schemas_parsed_once(), no_validation_on_read():
            seen.append((asdf.schema._make_schema_loader is not loader, config.validate_on_read))
            entered[i].set()
            leave[i].wait(10)

    threads = [threading.Thread(target=hold, args=(i,)) for i in range(3)]
    for t, e in zip(threads, entered, strict=True):
        t.start()
        e.wait(10)
    for i in (1, 0):  # the first holder ends before the last one
        leave[i].set()
        threads[i].join(10)
        assert asdf.schema._make_schema_loader is not loader  # still held by thread 2
        assert config.validate_on_read is False
    leave[2].set()
    threads[2].join(10)
    assert seen == [(True, False)] * 3
    assert asdf.schema._make_schema_loader is loader
    assert asdf.schema._make_jsonschema_refresolver is resolver
    assert config.validate_on_read is validate_on_read


def test_settings_restored_after_an_error(models, tmp_path):
    loader = asdf.schema._make_schema_loader
    resolver = asdf.schema._make_jsonschema_refresolver
    model = models[2].copy()
    model.meta.instrument.detector = "WFI99"
    with pytest.raises(ValidationError), schemas_parsed_once():
        _save(model, tmp_path / "bad.asdf")
    assert asdf.schema._make_schema_loader is loader
    assert asdf.schema._make_jsonschema_refresolver is resolver


def test_schemas_parsed_once_shares_resolver_caches_not_resolvers(models, tmp_path):
    """Each file's validation gets a new resolver, with the first one's caches."""
    make = asdf.schema._make_jsonschema_refresolver
    made, misses = [], []
    with schemas_parsed_once():
        sharing = asdf.schema._make_jsonschema_refresolver
        assert sharing is not make
        asdf.schema._make_jsonschema_refresolver = lambda *a: made.append(sharing(*a)) or made[-1]
        try:
            for i, m in enumerate(models):
                _save(m, tmp_path / f"shared{i}.asdf")
                info = made[0]._urljoin_cache.cache_info(), made[0]._remote_cache.cache_info()
                misses.append((info[0].misses, info[1].misses))
        finally:
            asdf.schema._make_jsonschema_refresolver = sharing
    assert asdf.schema._make_jsonschema_refresolver is make  # restored
    assert len(made) == len({id(r) for r in made}) >= len(models)  # a new one per file
    assert len({id(r._urljoin_cache) for r in made}) == 1  # one cache for all
    assert len({id(r._remote_cache) for r in made}) == 1
    assert misses[0][0] > 50  # the first file fills them ...
    assert misses[0][1] > 10
    assert misses[1:] == [misses[0]] * (len(models) - 1)  # ... the next ones only find
    assert all(r.resolution_scope == "" for r in made)  # every scope back at its base
    for i in range(len(models)):
        _save(models[i], tmp_path / f"plain{i}.asdf")
        assert _tree(tmp_path / f"shared{i}.asdf") == _tree(tmp_path / f"plain{i}.asdf")
