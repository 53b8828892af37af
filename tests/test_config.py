"""Typed config: unknown keys, strict booleans, precedence CLI > file > defaults."""
import pytest

from ckd.config import ConfigError, content_key, load_config
from student.config import DistillConfig

pytestmark = pytest.mark.unit


def test_precedence_and_types(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("train:\n  epochs: 7\n  lr: 0.01\nkd:\n  integration: mean\n")
    cfg = load_config(DistillConfig, f, overrides=["train.epochs=3", "curriculum.enabled=false",
                                                   "data.domains=Scientific,Office14"])
    assert cfg.train.epochs == 3 and cfg.train.lr == 0.01 and cfg.kd.integration == "mean"
    assert cfg.curriculum.enabled is False and cfg.data.domains == ["Scientific", "Office14"]
    assert cfg.train.batch_size == DistillConfig().train.batch_size


def test_unknown_key_is_an_error(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("train:\n  epochz: 7\n")
    with pytest.raises(ConfigError, match="train.epochz"):
        load_config(DistillConfig, f)


@pytest.mark.parametrize("override", ["curriculum.enabled=maybe", "train.epochs=2.5", "kd.integration=max",
                                      "service.failure_policy=ignore", "train.lr_decay_factor=1.5",
                                      "train.lr_decay_patience=-1", "train.ema_decay=1.0",
                                      "train.lr_schedule=linear", "train.warmup_steps=-5",
                                      "train.objective=every", "train.length_sorted_pieces=-1",
                                      "train.label_smoothing=1.0", "kd.gate=always", "kd.gate_floor=2"])
def test_bad_values_are_named(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].split(".")[-1]):
        load_config(DistillConfig, None, overrides=[override])


def test_plateau_decay_and_a_schedule_are_exclusive():
    with pytest.raises(ConfigError, match="lr_decay_patience cannot be combined"):
        load_config(DistillConfig, None, overrides=["train.lr_decay_patience=2", "train.lr_schedule=cosine"])


@pytest.mark.parametrize("extra, problem", [
    (["--set", "model.kind=fm", "--teachers", "none"], "needs model.kind=sasrec"),
    (["--set", "curriculum.enabled=true", "--teachers", "none"], "curriculum.enabled"),
    (["--set", "service.spec=configs/demo/serve.yaml"], "--teachers none"),
])
def test_every_position_objective_is_for_sasrec_alone(extra, problem):
    from launch.distill import parse_args, resolve_config

    base = ["--set", "train.objective=all_positions", "--set", "curriculum.enabled=false"]
    with pytest.raises(ConfigError, match=problem):
        resolve_config(parse_args(base + extra))
    cfg = resolve_config(parse_args(base + ["--teachers", "none"]))  # SASRec alone is fine
    assert cfg.train.objective == "all_positions" and not cfg.service.active


def test_length_sorted_pieces_are_for_the_ce_loss_alone():
    from launch.distill import parse_args, resolve_config

    with pytest.raises(ConfigError, match="length_sorted_pieces splits"):
        resolve_config(parse_args(["--set", "train.length_sorted_pieces=4",
                                   "--set", "service.spec=configs/demo/serve.yaml"]))
    cfg = resolve_config(parse_args(["--set", "train.length_sorted_pieces=4", "--teachers", "none"]))
    assert cfg.train.length_sorted_pieces == 4


def test_yaml_tags_do_not_execute(tmp_path):
    f = tmp_path / "evil.yaml"
    f.write_text("run_dir: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(DistillConfig, f)


def test_entry_point_decides_which_teachers_it_starts(two_teacher_spec):
    """launch/distill.py starts the embedded service of service.spec itself, cut to --teachers; a run
    that joins a service (or has none) starts nothing."""
    from launch.distill import embedded_spec, parse_args, resolve_config

    spec = two_teacher_spec
    every, names = embedded_spec(resolve_config(parse_args(["--set", f"service.spec={spec}"])))
    assert names == ["a", "b"] and [t.name for t in every.teachers] == ["a", "b"]
    cut, names = embedded_spec(resolve_config(parse_args(["--set", f"service.spec={spec}", "--teachers", "b"])))
    assert names == ["b"] and [(t.name, t.replicas) for t in cut.teachers] == [("b", 1)]
    for joins in (["--ray-address", "127.0.0.1:6379"], ["--teachers", "none"],
                  ["--set", 'service.endpoints={"a": ["127.0.0.1:1"]}']):
        assert embedded_spec(resolve_config(parse_args(["--set", f"service.spec={spec}", *joins]))) is None


def test_run_joins_the_namespace_of_the_spec_it_starts(two_teacher_spec):
    """A spec with its own namespace (configs/union/serve.yaml: ckd-union) deploys there, so the
    student must look its teachers up there too, not under service.namespace's default."""
    from launch.distill import embedded_spec, parse_args, resolve_config

    spec = two_teacher_spec
    spec.write_text("namespace: ckd-elsewhere\n" + spec.read_text())
    cfg = resolve_config(parse_args(["--set", f"service.spec={spec}"]))
    assert cfg.service.namespace != "ckd-elsewhere"
    deploy, _ = embedded_spec(cfg)
    assert deploy.namespace == cfg.service.namespace == "ckd-elsewhere"


def test_teacher_names_outside_the_spec_are_refused_before_anything_starts(tmp_path, two_teacher_spec, capsys):
    from launch.distill import main

    spec = two_teacher_spec
    code = main(["--set", f"service.spec={spec}", "--teachers", "a,zeta", "--run-dir", str(tmp_path / "run")])
    assert code == 2
    assert f"config error: service.teachers names ['zeta'], not in the deploy spec {spec}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # no run directory, accelerator or Ray yet


def test_content_key_reads_a_yaml_file_by_its_document_and_anything_else_by_its_bytes():
    a = b"train:\n  epochs: 3\n  lr: 0.001\nmodel: {hidden: 64}\n"
    reordered = b"# why this config exists\nmodel:\n  hidden: 64\ntrain: {lr: 0.001, epochs: 3}\n"
    assert content_key("x.yaml", a) == content_key("x.yml", reordered)
    assert content_key("x.yaml", a) != content_key("x.yaml", a.replace(b"epochs: 3", b"epochs: 4"))
    assert content_key("x.json", a) == a and content_key("x.json", reordered) != content_key("x.json", a)
    broken = b"a: [unclosed\n"
    assert content_key("x.yaml", broken) == broken  # does not parse: compared as bytes, never an error
    mixed = b"1: one\nb: two\n"  # keys that cannot be sorted together: compared as bytes
    assert content_key("x.yaml", mixed) == mixed


def test_a_config_states_only_what_it_changes_over_its_base(tmp_path):
    """``base:`` (relative to the naming file's folder, not the working directory): sections merge
    key by key, a list replaces the base's whole, a base may have a base; the merged result is what
    load_config trains."""
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "root.yaml").write_text(
        "data: {domains: [Scientific], max_len: 50}\ntrain: {epochs: 40, lr: 0.002, seed: 2024}\n")
    (tmp_path / "recipes" / "joint.yaml").write_text("base: root.yaml\ndata: {domains: [Scientific, Office14]}\n")
    (tmp_path / "recipes" / "joint_short.yaml").write_text("base: joint.yaml\ntrain: {epochs: 3}\n")
    from ckd.config import load_yaml

    got = load_yaml(tmp_path / "recipes" / "joint_short.yaml")
    assert got == {"data": {"domains": ["Scientific", "Office14"], "max_len": 50},
                   "train": {"epochs": 3, "lr": 0.002, "seed": 2024}}
    cfg = load_config(DistillConfig, tmp_path / "recipes" / "joint_short.yaml", overrides=["train.lr=0.01"])
    assert (cfg.data.domains, cfg.data.max_len, cfg.train.epochs, cfg.train.lr, cfg.train.seed) == (
        ["Scientific", "Office14"], 50, 3, 0.01, 2024)


def test_a_broken_base_is_an_error_naming_the_files(tmp_path):
    from ckd.config import load_yaml

    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    b.write_text("base: a.yaml\n")
    for text, error in (("base: b.yaml\n", r"name each other as base: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"),
                        ("base: missing.yaml\n", r"config file not found: .*missing\.yaml"),
                        ("base: [b.yaml]\n", r"a\.yaml: base must be the path of another config, got \['b.yaml'\]")):
        a.write_text(text)
        with pytest.raises(ConfigError, match=error):
            load_yaml(a)


def test_content_key_resolves_a_base_so_a_copy_and_its_base_form_compare_equal():
    files = {"c/root.yaml": b"train: {epochs: 40, lr: 0.002}\nkd: {lambda_kd: 1.0}\n",
             "c/child.yaml": b"# kd weight 3\nbase: root.yaml\nkd: {lambda_kd: 3.0}\n"}
    flat = b"train: {epochs: 40, lr: 0.002}\nkd: {lambda_kd: 3.0}\n"
    key = content_key("c/child.yaml", files["c/child.yaml"], files.get)
    assert key == content_key("c/flat.yaml", flat)
    edited = {**files, "c/root.yaml": files["c/root.yaml"].replace(b"lr: 0.002", b"lr: 0.005")}
    assert content_key("c/child.yaml", files["c/child.yaml"], edited.get) != key  # a base edit is a change
    unresolved = content_key("c/child.yaml", files["c/child.yaml"], {}.get)
    assert unresolved.startswith(b"unresolved base:") and unresolved != key


def test_every_committed_config_resolves_and_the_union_plan_trains_what_it_names():
    """Each YAML under configs/ loads over its base; every union student config is a DistillConfig
    and every union teacher config a TeacherConfig (a wrong key or a broken base fails here, not
    an hour into a run)."""
    from pathlib import Path

    from ckd.config import load_yaml
    from research import union
    from teachers.config import TeacherConfig

    repo = Path(__file__).resolve().parents[1]
    configs = sorted((repo / "configs").rglob("*.yaml"))
    assert len(configs) > 40
    for path in configs:
        assert "base" not in load_yaml(path), path
    plan = union.load_plan(repo / union.PLAN, union.PLAN)
    for s in plan.students:
        for config, _ in s.runs:
            assert load_config(DistillConfig, repo / config).data.domains, config
    for t in plan.teachers:
        assert load_config(TeacherConfig, repo / t.config).data.domains == list(plan.domains), t.config
