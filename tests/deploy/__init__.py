"""Deployment artifacts (issue 3), checked by the real tools for every combination they belong to.

One module per artifact, each tool also given a deliberately broken copy of a generated artifact
to prove the check can fail:

- test_tree: each artifact exists exactly for its deployment and follows the answers.
- test_dockerfile: hadolint, the Dockerfile's structure, the .dockerignore through Docker's own
  matching rules, and the HEALTHCHECK's command against answers of every kind.
- test_compose: `docker-compose config` and the compose-spec schema (check-jsonschema).
- test_nginx: `nginx -t` on the site, with paths and ports rewritten into a sandbox.
- test_systemd: `systemd-analyze verify` and `security` on the unit.
- test_workflow: actionlint and check-jsonschema (GitHub workflows, dependabot).
- test_guide: the install guide's shell, consistent with the files it installs.
- test_kubernetes: `kubectl kustomize`, `kubernetes-validate --strict` (1.31 and the newest
  bundled version) and checkov (kubernetes, dockerfile) on deploy/kubernetes; the manifests'
  consistency with the service's routes, bind, settings, gunicorn.conf.py, the Dockerfile's uid
  and the image CI pushes; the Kubernetes guide against the manifests.
- test_kubernetes_pod (marked `boot` or `drills` too): the Deployment's pod run as specified
  (its command, ConfigMap, a Secret made from `.env`, uid, read-only root with the emptyDirs
  writable, no capabilities) under bubblewrap, driven by a harness playing kubelet and the
  Service with the manifests' numbers: startup probe, a rolling update under load, a
  PostgreSQL outage.
- test_live (marked `boot` too): nginx started on loopback ports with the generated site (paths
  and ports rewritten, nothing else) in front of the generated service, booted as the
  Dockerfile/compose.yaml or the systemd unit would boot it.
- test_backup (marked `boot` too): the guide's backup and restore runbook (pg_dump,
  pg_restore, the renaming) run on real PostgreSQL, the items read back through the service, for
  systemd and docker; broken copies (a dump without rows, a restore without --role) fail it.

Shared: the tools, the checks and the parsing in `support`; the renderings (one per combination
and xdist worker) and throwaway certificates in `conftest`.
"""
