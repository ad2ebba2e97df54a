"""The Kubernetes manifests in deploy/k8s, checked offline against the service itself.

No cluster, no network, no kustomize binary: each kustomization is rendered here
from the fields the manifests use (``resources``, strategic-merge ``patches``
including ``$patch: delete``, ``images``, ``replicas``). A kustomization using
any other field, or a patch this renderer cannot merge faithfully, fails the
test instead of being rendered wrong. Each rendering (base, production) is then
checked:

- against a minimal JSON Schema per kind, for the fields that matter;
- every ``CREDITNOTES_*`` name is a field of :class:`service.settings.Settings`,
  and the environment each container gets builds a valid ``Settings``;
- probes, port, scrape annotations, user and grace period agree with that
  ``Settings``, ``service/main.py`` and ``deploy/Dockerfile``;
- KEDA's triggers cover exactly the input topics, for the ConfigMap's consumer
  group, within the declared partition count, over the service's protocol but with
  KEDA's own credentials;
- the migration Job runs ``migrate`` with the migrator's credentials only;
- every input topic has an allow-list, production verifies PostgreSQL's certificate
  (``sslmode=verify-full``), the fetch limits fit the memory limit, and a
  NetworkPolicy admits only the probes and the scrape and lets out only PostgreSQL,
  Kafka and DNS.
"""

from __future__ import annotations

import copy
import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import jsonschema
import pytest
import yaml

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
BASE = K8S / "base"
PRODUCTION = K8S / "overlays" / "production"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"

#: Where the input topics' partition count is written down (on the ScaledObject).
PARTITIONS_ANNOTATION = "creditnotes/input-topic-partitions"
#: The service's memory target (under 300 MB resident): the limit must leave room for it.
MEMORY_TARGET_BYTES = 300 * 10**6
#: What the service holds besides fetched records (interpreter, libraries, pool, outbox
#: batch); tests/faults/test_memory_flood.py measured a peak of about 210 MiB in all,
#: records included, under a flood of 1 MB records.
BASELINE_BYTES = 200 * 2**20
SERVICE_CONTAINER = "creditnotes"
SETTING_NAMES = frozenset(f"CREDITNOTES_{name.upper()}" for name in Settings.model_fields)
# what KEDA's kafka scaler calls the service's CREDITNOTES_KAFKA_SASL_MECHANISM values
KEDA_SASL = {None: "none", "PLAIN": "plaintext", "SCRAM-SHA-256": "scram_sha256",
             "SCRAM-SHA-512": "scram_sha512"}

Resource = dict[str, Any]


# --- rendering ---------------------------------------------------------------------------------

_KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "patches", "images", "replicas"}
_POD_TEMPLATE_KINDS = {"Deployment", "Job"}


def load_documents(path: Path) -> list[Resource]:
    with path.open() as stream:
        return [document for document in yaml.safe_load_all(stream) if document is not None]


def render(directory: Path) -> list[Resource]:
    """What ``kustomize build directory`` gives, for the fields these manifests use."""
    [kustomization] = load_documents(directory / "kustomization.yaml")
    unknown = set(kustomization) - _KUSTOMIZATION_FIELDS
    assert not unknown, f"{directory}: the test's renderer does not know {sorted(unknown)}"
    resources: list[Resource] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        resources += render(path) if path.is_dir() else load_documents(path)
    for patch_entry in kustomization.get("patches", []):
        assert set(patch_entry) == {"path"}, f"only file patches are rendered: {patch_entry}"
        for patch in load_documents(directory / patch_entry["path"]):
            resources = _apply_patch(resources, patch)
    for image in kustomization.get("images", []):
        _set_image(resources, image)
    for replica in kustomization.get("replicas", []):
        [target] = [resource for resource in resources
                    if resource["kind"] == "Deployment" and name_of(resource) == replica["name"]]
        target["spec"]["replicas"] = replica["count"]
    return resources


def _apply_patch(resources: list[Resource], patch: Resource) -> list[Resource]:
    key = (patch["kind"], name_of(patch))
    matches = [index for index, resource in enumerate(resources)
               if (resource["kind"], name_of(resource)) == key]
    assert len(matches) == 1, f"a patch must name exactly one resource: {key}"
    [index] = matches
    if patch.get("$patch") == "delete":
        return resources[:index] + resources[index + 1:]
    directives = [text for text in _keys_in(patch) if text.startswith("$")]
    assert not directives, f"patch directives not rendered here: {directives}"
    if "." not in patch["apiVersion"].partition("/")[0]:  # v1, apps/v1, policy/v1, ...
        # Built-in kinds merge some lists by key (containers by name, ...): not rendered here.
        assert not _holds_list(patch), f"patch of built-in {key} with a list: not rendered here"
    patched = list(resources)
    patched[index] = _merge(resources[index], patch)
    return patched


def _keys_in(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [str(key) for key in value] + [key for item in value.values() for key in _keys_in(item)]
    if isinstance(value, list):
        return [key for item in value for key in _keys_in(item)]
    return []


def _holds_list(value: Any) -> bool:
    if isinstance(value, list):
        return True
    return isinstance(value, dict) and any(_holds_list(item) for item in value.values())


def _merge(target: Any, patch: Any) -> Any:
    """Strategic merge as kustomize does it for custom resources: maps merge, lists are replaced."""
    if not (isinstance(target, dict) and isinstance(patch, dict)):
        return copy.deepcopy(patch)
    merged = copy.deepcopy(target)
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = _merge(merged.get(key), value)
    return merged


def _set_image(resources: list[Resource], image: dict[str, str]) -> None:
    assert set(image) <= {"name", "newName", "newTag"}, image
    for resource in resources:
        for container in containers_of(resource):
            name, tag = _split_image(container["image"])
            if name == image["name"]:
                new_tag = image.get("newTag", tag)
                container["image"] = image.get("newName", name) + (f":{new_tag}" if new_tag else "")


def _split_image(image: str) -> tuple[str, str]:
    """``registry:5000/name:tag`` into its name and tag (no digests here)."""
    assert "@" not in image, f"digests are not rendered here: {image}"
    name, colon, tag = image.rpartition(":")
    return (name, tag) if colon and "/" not in tag else (image, "")


# --- looking things up -------------------------------------------------------------------------

def name_of(resource: Resource) -> str:
    return str(resource["metadata"]["name"])


def containers_of(resource: Resource) -> list[dict[str, Any]]:
    if resource["kind"] not in _POD_TEMPLATE_KINDS:
        return []
    spec = resource["spec"]["template"]["spec"]
    return list(spec.get("initContainers", [])) + list(spec["containers"])


@dataclass
class Variant:
    name: str
    resources: list[Resource]
    #: What each Secret holds: the rendered ones, and for a Secret an overlay leaves to the
    #: platform's secret manager, the base's placeholder (the manager supplies the same keys).
    secrets: dict[str, dict[str, str]]

    def one(self, kind: str, name: str | None = None) -> Resource:
        found = [resource for resource in self.resources if resource["kind"] == kind
                 and (name is None or name_of(resource) == name)]
        assert len(found) == 1, f"{self.name}: expected one {kind} {name or ''}, found {len(found)}"
        return found[0]

    def all(self, kind: str) -> list[Resource]:
        return [resource for resource in self.resources if resource["kind"] == kind]

    @property
    def deployment(self) -> Resource:
        return self.one("Deployment")

    @property
    def job(self) -> Resource:
        return self.one("Job")

    @property
    def scaled_object(self) -> Resource:
        return self.one("ScaledObject")

    def service_container(self) -> dict[str, Any]:
        [container] = [container for container in containers_of(self.deployment)
                       if container["name"] == SERVICE_CONTAINER]
        return container

    def environment(self, container: dict[str, Any]) -> dict[str, str]:
        """The environment the container starts with (the image's own ENV aside)."""
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                env.update(self.one("ConfigMap", source["configMapRef"]["name"])["data"])
            else:
                env.update(self.secrets[source["secretRef"]["name"]])
        for variable in container.get("env", []):
            if "value" in variable:
                env[variable["name"]] = variable["value"]
                continue
            reference = variable["valueFrom"]
            if "secretKeyRef" in reference:
                ref = reference["secretKeyRef"]
                env[variable["name"]] = self.secrets[ref["name"]][ref["key"]]
            else:
                ref = reference["configMapKeyRef"]
                env[variable["name"]] = self.one("ConfigMap", ref["name"])["data"][ref["key"]]
        return env


def _secrets(resources: list[Resource]) -> dict[str, dict[str, str]]:
    return {name_of(secret): dict(secret.get("stringData", {}))
            for secret in resources if secret["kind"] == "Secret"}


@functools.cache
def variant(name: str) -> Variant:
    base = render(BASE)
    if name == "base":
        return Variant(name, base, _secrets(base))
    resources = render(PRODUCTION)
    return Variant(name, resources, _secrets(base) | _secrets(resources))


VARIANTS = ["base", "production"]


@pytest.fixture(params=VARIANTS)
def manifests(request: pytest.FixtureRequest) -> Variant:
    return variant(request.param)


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """``Settings`` as the container would build it: from this environment alone."""
    for key in list(os.environ):
        if key.startswith("CREDITNOTES_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings(_env_file=None)  # type: ignore[call-arg]


def service_settings(manifests: Variant, monkeypatch: pytest.MonkeyPatch) -> Settings:
    return settings_from(manifests.environment(manifests.service_container()), monkeypatch)


def dockerfile(pattern: str) -> str:
    match = re.search(pattern, DOCKERFILE.read_text(), re.MULTILINE)
    assert match, f"deploy/Dockerfile has no line matching {pattern!r}"
    return match.group(1)


_QUANTITY_UNITS = {"": 1.0, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9,
                   "Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30}


def quantity(text: str | int) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(m|k|M|G|Ki|Mi|Gi)?", str(text))
    assert match, f"not a Kubernetes quantity: {text!r}"
    return float(match.group(1)) * _QUANTITY_UNITS[match.group(2) or ""]


def strings_in(value: Any) -> list[str]:
    """Every string in a document, keys and values."""
    if isinstance(value, dict):
        return [text for key, item in value.items() for text in [str(key), *strings_in(item)]]
    if isinstance(value, list):
        return [text for item in value for text in strings_in(item)]
    return [value] if isinstance(value, str) else []


# --- minimal schemas: the fields that matter ---------------------------------------------------

def _object(required: dict[str, Any], *, properties: dict[str, Any] | None = None,
            **extra: Any) -> dict[str, Any]:
    """An object with these required properties (and these optional ones)."""
    return {"type": "object", "required": list(required),
            "properties": {**required, **(properties or {})}, **extra}


_NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}
_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = _object({"name": _NAME}, properties={"labels": _STRINGS, "annotations": _STRINGS})
_POSITIVE = {"type": "integer", "minimum": 1}
_QUANTITY = {"type": "string", "pattern": r"^\d+(\.\d+)?(m|k|M|G|Ki|Mi|Gi)?$"}
_ENV_NAME = {"type": "string", "pattern": r"^[A-Z_][A-Z0-9_]*$"}
_PROBE = _object({
    "httpGet": _object({"path": {"type": "string", "pattern": "^/"},
                        "port": {"type": ["integer", "string"]}}),
    "periodSeconds": _POSITIVE, "timeoutSeconds": _POSITIVE, "failureThreshold": _POSITIVE})
_SECCOMP = _object({"type": {"const": "RuntimeDefault"}})
_CONTAINER = _object({
    "name": _NAME,
    "image": {"type": "string", "minLength": 1},
    "args": {"type": "array", "items": {"type": "string"}, "minItems": 1},
    "resources": _object({"requests": _object({"cpu": _QUANTITY, "memory": _QUANTITY}),
                          "limits": _object({"cpu": _QUANTITY, "memory": _QUANTITY})}),
    "securityContext": _object({
        "allowPrivilegeEscalation": {"const": False},
        "readOnlyRootFilesystem": {"const": True},
        "runAsNonRoot": {"const": True},
        "capabilities": _object({"drop": {"const": ["ALL"]}}, properties={"add": {"maxItems": 0}}),
        "seccompProfile": _SECCOMP}),
}, properties={
    "ports": {"type": "array", "items": _object({"name": _NAME, "containerPort": _POSITIVE})},
    "env": {"type": "array", "items": {
        "allOf": [_object({"name": _ENV_NAME}),
                  {"oneOf": [{"required": ["value"], "properties": {"value": {"type": "string"}}},
                             {"required": ["valueFrom"]}]}]}},
    "envFrom": {"type": "array", "items": {"type": "object", "minProperties": 1}},
    "command": False,  # the image's ENTRYPOINT (creditnotes) stays; args choose the subcommand
})
_POD_SPEC = _object({
    "serviceAccountName": _NAME,
    "automountServiceAccountToken": {"const": False},
    "securityContext": _object({"runAsNonRoot": {"const": True}, "runAsUser": _POSITIVE,
                                "seccompProfile": _SECCOMP}),
    "containers": {"type": "array", "minItems": 1, "items": _CONTAINER},
})


def _pod_template(spec: dict[str, Any]) -> dict[str, Any]:
    return _object({"metadata": _object({"labels": _STRINGS}), "spec": {"allOf": [_POD_SPEC, spec]}})


def _kind(api_version: str, kind: str, **fields: Any) -> dict[str, Any]:
    return _object({"apiVersion": {"const": api_version}, "kind": {"const": kind},
                    "metadata": _METADATA, **fields})


_SERVICE_CONTAINER = {"allOf": [_CONTAINER, {
    "required": ["ports", "envFrom", "startupProbe", "livenessProbe", "readinessProbe"],
    "properties": {"startupProbe": _PROBE, "livenessProbe": _PROBE, "readinessProbe": _PROBE}}]}
_KAFKA_TRIGGER = _object({
    "type": {"const": "kafka"},
    "metadata": {
        "allOf": [
            _object({"topic": {"type": "string", "minLength": 1},
                     "lagThreshold": {"type": "string", "pattern": "^[1-9][0-9]*$"}}),
            {"anyOf": [{"required": ["consumerGroup"]}, {"required": ["consumerGroupFromEnv"]}]},
            {"anyOf": [{"required": ["bootstrapServers"]},
                       {"required": ["bootstrapServersFromEnv"]}]},
        ],
        "additionalProperties": {"type": "string"},  # KEDA's trigger metadata is strings only
    },
}, properties={"authenticationRef": _object({"name": _NAME})})

SCHEMAS: dict[str, dict[str, Any]] = {
    "ServiceAccount": _kind("v1", "ServiceAccount",
                            automountServiceAccountToken={"const": False}),
    "ConfigMap": _kind("v1", "ConfigMap", data={
        "type": "object", "propertyNames": {"pattern": "^CREDITNOTES_[A-Z0-9_]+$"},
        "additionalProperties": {"type": "string"}}),
    "Secret": {"allOf": [
        _kind("v1", "Secret", type={"const": "Opaque"}, stringData=_STRINGS),
        {"not": {"required": ["data"]}},  # placeholders are readable text, never base64
    ]},
    "Deployment": _kind("apps/v1", "Deployment", spec=_object({
        "replicas": _POSITIVE,
        "selector": _object({"matchLabels": _STRINGS}),
        "template": _pod_template(_object({
            "terminationGracePeriodSeconds": _POSITIVE,
            "containers": {"type": "array", "items": _SERVICE_CONTAINER}})),
    })),
    "Job": _kind("batch/v1", "Job", spec=_object({
        "backoffLimit": {"type": "integer", "minimum": 0},
        "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
        "template": _pod_template(_object({"restartPolicy": {"enum": ["Never", "OnFailure"]}})),
    })),
    "PodDisruptionBudget": _kind("policy/v1", "PodDisruptionBudget", spec=_object({
        "minAvailable": {"type": ["integer", "string"]},
        "selector": _object({"matchLabels": _STRINGS})})),
    "ScaledObject": _kind("keda.sh/v1alpha1", "ScaledObject", spec=_object({
        "scaleTargetRef": _object({"name": _NAME, "kind": {"const": "Deployment"}}),
        "minReplicaCount": _POSITIVE,
        "maxReplicaCount": _POSITIVE,
        "triggers": {"type": "array", "minItems": 1, "items": _KAFKA_TRIGGER},
    })),
    "TriggerAuthentication": _kind("keda.sh/v1alpha1", "TriggerAuthentication", spec=_object({
        "secretTargetRef": {"type": "array", "minItems": 1, "items": _object({
            "parameter": {"type": "string"}, "name": _NAME, "key": {"type": "string"}})},
    }, properties={"env": False})),  # never the service container's environment
    "NetworkPolicy": _kind("networking.k8s.io/v1", "NetworkPolicy", spec=_object({
        "podSelector": _object({"matchLabels": _STRINGS}),
        "policyTypes": {"const": ["Ingress", "Egress"]},
        "ingress": {"type": "array", "items": _object({"ports": {"type": "array", "minItems": 1},
                                                       "from": {"type": "array", "minItems": 1}})},
        "egress": {"type": "array", "items": _object({"ports": {"type": "array", "minItems": 1}})},
    })),
}


# --- the kustomizations ------------------------------------------------------------------------

@pytest.mark.parametrize("directory", [BASE, PRODUCTION], ids=["base", "production"])
def test_every_file_a_kustomization_names_exists_and_none_is_left_out(directory: Path) -> None:
    [kustomization] = load_documents(directory / "kustomization.yaml")
    named = [*kustomization.get("resources", []),
             *(patch["path"] for patch in kustomization.get("patches", []))]
    for entry in named:
        path = (directory / entry).resolve()
        assert path.exists(), f"{directory}: {entry} does not exist"
        if path.is_dir():
            assert (path / "kustomization.yaml").is_file(), f"{entry} is no kustomization"
    files = {path.name for path in directory.glob("*.yaml")} - {"kustomization.yaml"}
    assert files <= set(named), f"{directory}: manifests no kustomization uses: {files - set(named)}"


def test_the_renderer_applies_the_overlay() -> None:
    base, production = variant("base"), variant("production")
    data = production.one("ConfigMap")["data"]
    assert data["CREDITNOTES_HTTP_PORT"] == base.one("ConfigMap")["data"]["CREDITNOTES_HTTP_PORT"]
    assert data["CREDITNOTES_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert production.all("Secret") == []
    assert len(production.scaled_object["spec"]["triggers"]) == len(
        base.scaled_object["spec"]["triggers"])


def test_every_resource_matches_its_schema(manifests: Variant) -> None:
    for resource in manifests.resources:
        assert resource["kind"] in SCHEMAS, f"no schema for {resource['kind']}"
        jsonschema.validate(resource, SCHEMAS[resource["kind"]],
                            cls=jsonschema.Draft202012Validator)
    keys = [(resource["kind"], name_of(resource)) for resource in manifests.resources]
    assert len(keys) == len(set(keys)), "two resources of one kind share a name"


def test_references_between_resources_resolve(manifests: Variant) -> None:
    accounts = {name_of(account) for account in manifests.all("ServiceAccount")}
    for workload in (manifests.deployment, manifests.job):
        assert workload["spec"]["template"]["spec"]["serviceAccountName"] in accounts
        for container in containers_of(workload):
            manifests.environment(container)  # every ConfigMap, Secret and key it names exists
    target = manifests.scaled_object["spec"]["scaleTargetRef"]
    assert target["name"] == name_of(manifests.deployment)
    assert target.get("envSourceContainerName", SERVICE_CONTAINER) in {
        container["name"] for container in containers_of(manifests.deployment)}
    for trigger in manifests.scaled_object["spec"]["triggers"]:
        if "authenticationRef" in trigger:
            manifests.one("TriggerAuthentication", trigger["authenticationRef"]["name"])


# --- configuration -----------------------------------------------------------------------------

def test_every_creditnotes_name_is_a_setting(manifests: Variant) -> None:
    used = {text for resource in manifests.resources for text in strings_in(resource)
            if re.fullmatch(r"CREDITNOTES_[A-Z0-9_]+", text)}
    assert used, "no CREDITNOTES_* name found at all"
    assert used <= SETTING_NAMES, f"not fields of Settings: {sorted(used - SETTING_NAMES)}"


def test_each_container_starts_with_valid_settings(manifests: Variant,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    for workload in (manifests.deployment, manifests.job):
        for container in containers_of(workload):
            settings_from(manifests.environment(container), monkeypatch)  # raises if invalid


def test_secrets_stay_out_of_the_config_map(manifests: Variant) -> None:
    data = manifests.one("ConfigMap")["data"]
    assert "CREDITNOTES_DATABASE_URL" not in data
    assert not [key for key in data if "PASSWORD" in key or key.endswith("KEYFILE")]


def test_base_secrets_are_placeholders_that_production_never_applies() -> None:
    for secret in variant("base").all("Secret"):
        for key, value in secret["stringData"].items():
            assert "CHANGE-ME" in value, f"{name_of(secret)}/{key} is not a placeholder"
    assert variant("production").all("Secret") == []
    for resource in variant("production").resources:
        assert not [text for text in strings_in(resource) if "CHANGE-ME" in text]


# --- the service's pods ------------------------------------------------------------------------

def test_service_runs_run_and_probes_its_http_port(manifests: Variant,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    settings = service_settings(manifests, monkeypatch)
    container = manifests.service_container()
    assert container["args"] == ["run"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"http": settings.http_port, "metrics": settings.metrics_port}
    assert settings.metrics_port != settings.http_port  # the scrape can be kept internal
    assert settings.http_port == int(dockerfile(r"^EXPOSE (\d+)\s*$"))

    def probed(probe: str) -> tuple[str, int]:
        http = container[probe]["httpGet"]
        port = http["port"]
        return http["path"], ports[port] if isinstance(port, str) else port

    assert probed("startupProbe") == ("/healthz", settings.http_port)
    assert probed("livenessProbe") == ("/healthz", settings.http_port)
    assert probed("readinessProbe") == ("/readyz", settings.http_port)
    annotations = manifests.deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(settings.metrics_port)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_pods_run_as_the_image_user_non_root_on_a_read_only_filesystem(manifests: Variant) -> None:
    uid = int(dockerfile(r"^ARG APP_UID=(\d+)\s*$"))
    for workload in (manifests.deployment, manifests.job):
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == uid != 0
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for container in containers_of(workload):
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"]["drop"] == ["ALL"]
            assert security.get("runAsUser", uid) == uid


def test_grace_period_outlasts_the_shutdown(manifests: Variant,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # service/main.py waits up to the shutdown timeout for the message in flight
    # (broker.stop) and then up to as long again for the outbox relay: both must fit.
    settings = service_settings(manifests, monkeypatch)
    grace = manifests.deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > settings.shutdown_timeout_seconds
    assert grace > 2 * settings.shutdown_timeout_seconds


def test_resources_leave_room_for_the_memory_target(manifests: Variant) -> None:
    for workload in (manifests.deployment, manifests.job):
        for container in containers_of(workload):
            requests, limits = container["resources"]["requests"], container["resources"]["limits"]
            for resource in ("cpu", "memory"):
                assert quantity(requests[resource]) <= quantity(limits[resource])
    limits = manifests.service_container()["resources"]["limits"]
    assert quantity(limits["memory"]) > MEMORY_TARGET_BYTES


def test_disruption_budget_covers_the_service_pods_only(manifests: Variant) -> None:
    budget = manifests.one("PodDisruptionBudget")["spec"]
    selector = budget["selector"]["matchLabels"]

    def selected(workload: Resource) -> bool:
        labels = workload["spec"]["template"]["metadata"]["labels"]
        return selector.items() <= labels.items()

    assert budget["minAvailable"] == 1
    assert selected(manifests.deployment)
    assert selector == manifests.deployment["spec"]["selector"]["matchLabels"]
    assert not selected(manifests.job)
    assert budget["minAvailable"] < manifests.scaled_object["spec"]["minReplicaCount"]


# --- migrations --------------------------------------------------------------------------------

def test_migration_job_migrates_with_the_migrator_credentials_only(
        manifests: Variant, monkeypatch: pytest.MonkeyPatch) -> None:
    job = manifests.job
    [container] = containers_of(job)
    assert container["args"] == ["migrate"]
    assert container["image"] == manifests.service_container()["image"]
    assert job["spec"]["backoffLimit"] >= 1
    assert job["spec"]["ttlSecondsAfterFinished"] > 0
    [url] = [variable for variable in container["env"]
             if variable["name"] == "CREDITNOTES_DATABASE_URL"]
    reference = url["valueFrom"]["secretKeyRef"]
    assert reference["key"] == "migrator-database-url"
    service_secrets = {source["secretRef"]["name"]
                       for source in manifests.service_container()["envFrom"]
                       if "secretRef" in source}
    assert reference["name"] not in service_secrets, "the service's pods would get the DDL role"
    assert "envFrom" not in container, "the migrator gets only what migrate reads"
    settings = settings_from(manifests.environment(container), monkeypatch)
    secret_url = manifests.secrets[reference["name"]]["migrator-database-url"]
    assert settings.database_url.partition("?")[0] == secret_url  # TLS options added to it
    assert settings.database_sslmode == service_settings(manifests, monkeypatch).database_sslmode


# --- autoscaling -------------------------------------------------------------------------------

def test_keda_triggers_cover_exactly_the_input_topics_of_the_consumer_group(
        manifests: Variant, monkeypatch: pytest.MonkeyPatch) -> None:
    env = manifests.environment(manifests.service_container())
    settings = settings_from(env, monkeypatch)  # Settings() as the service's container builds it
    triggers = manifests.scaled_object["spec"]["triggers"]
    topics = [trigger["metadata"]["topic"] for trigger in triggers]
    assert sorted(topics) == sorted(settings.topics.inputs())
    assert len(topics) == len(set(topics))
    for trigger in triggers:
        metadata = trigger["metadata"]
        group = metadata.get("consumerGroup") or env[metadata["consumerGroupFromEnv"]]
        assert group == settings.consumer_group == env["CREDITNOTES_CONSUMER_GROUP"]
        servers = metadata.get("bootstrapServers") or env[metadata["bootstrapServersFromEnv"]]
        assert servers == settings.kafka_bootstrap_servers
        assert metadata["offsetResetPolicy"] == "earliest"  # the service's auto_offset_reset
        assert metadata["allowIdleConsumers"] == "false"


def test_replicas_stay_within_the_partition_count(manifests: Variant) -> None:
    scaled = manifests.scaled_object
    partitions = int(scaled["metadata"]["annotations"][PARTITIONS_ANNOTATION])
    spec = scaled["spec"]
    assert 2 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= partitions
    assert manifests.deployment["spec"]["replicas"] == spec["minReplicaCount"]


def test_keda_reaches_the_broker_over_the_services_protocol_as_its_own_principal(
        manifests: Variant, monkeypatch: pytest.MonkeyPatch) -> None:
    container = manifests.service_container()
    env = manifests.environment(container)
    settings = settings_from(env, monkeypatch)
    sasl = KEDA_SASL[settings.kafka_sasl_mechanism
                     if settings.kafka_security_protocol.startswith("SASL") else None]
    tls = "enable" if settings.kafka_security_protocol in {"SSL", "SASL_SSL"} else "disable"
    service_secrets = {source["secretRef"]["name"] for source in container["envFrom"]
                       if "secretRef" in source}
    for trigger in manifests.scaled_object["spec"]["triggers"]:
        assert trigger["metadata"].get("sasl", "none") == sasl
        assert trigger["metadata"].get("tls", "disable") == tls
        if sasl == "none":
            continue
        authentication = manifests.one("TriggerAuthentication",
                                       trigger["authenticationRef"]["name"])["spec"]
        assert "env" not in authentication, "KEDA must not read the service's environment"
        parameters = {item["parameter"]: item for item in authentication["secretTargetRef"]}
        assert {"username", "password"} <= set(parameters)
        for item in parameters.values():
            assert item["name"] not in service_secrets, "KEDA would get the service's credentials"
            assert item["key"] in manifests.secrets[item["name"]]
        username = manifests.secrets[parameters["username"]["name"]][parameters["username"]["key"]]
        assert username != settings.kafka_sasl_username


def test_production_runs_a_released_image_over_sasl_ssl(monkeypatch: pytest.MonkeyPatch) -> None:
    production = variant("production")
    for workload in (production.deployment, production.job):
        for container in containers_of(workload):
            assert _split_image(container["image"])[1] not in {"", "latest"}, container["image"]
    settings = service_settings(production, monkeypatch)
    assert settings.kafka_security_protocol == "SASL_SSL"
    assert settings.kafka_sasl_mechanism == "SCRAM-SHA-512"
    assert production.deployment["spec"]["replicas"] >= variant("base").deployment["spec"]["replicas"]


# --- security: sources, TLS, memory, network ---------------------------------------------------

def test_every_input_topic_has_an_allow_list(manifests: Variant,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    settings = service_settings(manifests, monkeypatch)
    assert not settings.allow_any_source
    assert settings.missing_allow_lists() == []  # `creditnotes run` would refuse otherwise
    lists = settings.allowed_sources()
    assert set(lists) == set(settings.topics.inputs())
    for topic, sources in lists.items():
        assert sources and all(source.startswith("/") for source in sources), topic
    # no upstream may publish on the commands topic and a trigger topic under one source
    commands = set(lists[settings.topics.credit_note_commands] or [])
    for topic in settings.topics.inputs():
        if topic != settings.topics.credit_note_commands:
            assert not commands & set(lists[topic] or []), topic


def test_production_verifies_the_database_certificate(monkeypatch: pytest.MonkeyPatch) -> None:
    production = variant("production")
    containers = [production.service_container(), *containers_of(production.job)]
    for container in containers:
        settings = settings_from(production.environment(container), monkeypatch)
        query = dict(parse_qsl(urlsplit(settings.database_url).query))
        assert query["sslmode"] == "verify-full", container["name"]
        assert query["sslrootcert"].startswith("/")


def test_fetch_limits_keep_a_flood_of_large_records_under_the_memory_limit(
        manifests: Variant, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two consumers (invoices, refund-results) plus one per crediting shard, each with one fetch
    buffered and one in flight, every record decoded once more while it is applied, beside
    the service's own footprint."""
    settings = service_settings(manifests, monkeypatch)
    consumers = 2 + settings.consumer_shards
    copies = 3  # the fetched bytes, their decoded form, a dead-letter copy
    records = consumers * 2 * settings.kafka_fetch_max_bytes * copies
    limit = quantity(manifests.service_container()["resources"]["limits"]["memory"])
    assert records + BASELINE_BYTES < 0.75 * limit, (records, limit)
    assert settings.max_message_bytes <= settings.kafka_fetch_max_bytes
    assert settings.kafka_max_partition_fetch_bytes <= settings.kafka_fetch_max_bytes


def _ports(rule: dict[str, Any]) -> set[tuple[int, str]]:
    return {(int(port["port"]), port.get("protocol", "TCP")) for port in rule["ports"]}


def test_a_network_policy_admits_the_probes_and_the_scrape_and_lets_out_only_the_servers(
        manifests: Variant, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = service_settings(manifests, monkeypatch)
    policy = manifests.one("NetworkPolicy")["spec"]
    selector = policy["podSelector"]["matchLabels"]
    for workload in (manifests.deployment, manifests.job):
        assert selector.items() <= workload["spec"]["template"]["metadata"]["labels"].items()
    assert settings.metrics_port is not None
    ingress = {frozenset(_ports(rule)): rule["from"] for rule in policy["ingress"]}
    assert ingress == {
        frozenset({(settings.http_port, "TCP")}): [{"podSelector": {}}],
        frozenset({(settings.metrics_port, "TCP")}): [{"namespaceSelector": {"matchLabels": {
            "kubernetes.io/metadata.name": "monitoring"}}}],
    }
    egress = set().union(*(_ports(rule) for rule in policy["egress"]))
    database_port = urlsplit(settings.database_url).port or 5432
    kafka_ports = {int(server.rsplit(":", 1)[1])
                   for server in settings.kafka_bootstrap_servers.split(",")}
    assert {(database_port, "TCP"), (53, "UDP"), (53, "TCP")} <= egress
    assert {(port, "TCP") for port in kafka_ports} <= egress
    assert egress <= {(5432, "TCP"), (9092, "TCP"), (9093, "TCP"), (53, "UDP"), (53, "TCP")}
    [dns] = [rule for rule in policy["egress"] if (53, "UDP") in _ports(rule)]
    assert dns["to"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "kube-system"}
