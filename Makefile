# Thin aliases; see README.md. PYTHON must be 3.11 or newer.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CLIENT := .cache/studioml-client
# Deploy tools, each in a venv of its own (never in .venv's lock): see README "Operators".
ANSIBLE := .cache/ansible
SALT_LINT := .cache/salt-lint
ANSIBLE_VERSIONS := ansible-core==2.19.14 ansible-lint==26.10.1
SALT_LINT_VERSIONS := salt-lint==0.9.2

.PHONY: venv demo test test-host unit lint format bench studioml-client clean deb lint-deploy deploy-tools

venv: $(BIN)/studio-agent

$(BIN)/studio-agent: pyproject.toml requirements/dev.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --require-hashes -r requirements/dev.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

# The real StudioML 0.0.49 client, in a venv of its own: the submitter in tests and benchmarks.
studioml-client: $(CLIENT)/bin/studio-run

$(CLIENT)/bin/studio-run:
	$(PYTHON) -m venv $(CLIENT)
	$(CLIENT)/bin/pip install --quiet --disable-pip-version-check studioml==0.0.49 'urllib3<2' 'requests-toolbelt<1'

# The .deb (dh-virtualenv): dist/studio-agent_<version>_amd64.deb. Needs debhelper dh-virtualenv.
deb:
	packaging/build-deb.sh dist

deploy-tools: $(ANSIBLE)/bin/ansible-lint $(SALT_LINT)/bin/salt-lint

$(ANSIBLE)/bin/ansible-lint:
	$(PYTHON) -m venv $(ANSIBLE)
	$(ANSIBLE)/bin/pip install --quiet --disable-pip-version-check $(ANSIBLE_VERSIONS)

$(SALT_LINT)/bin/salt-lint:
	$(PYTHON) -m venv $(SALT_LINT)
	$(SALT_LINT)/bin/pip install --quiet --disable-pip-version-check $(SALT_LINT_VERSIONS)

# ansible-lint (production profile), salt-lint, and lintian on the built .deb.
lint-deploy: deploy-tools deb
	cd ansible && ../$(ANSIBLE)/bin/ansible-lint --profile production ../deploy-runner.yml ../roles/studio_agent
	$(SALT_LINT)/bin/salt-lint salt/studio_agent/*.sls salt/studio_agent/*/*.sls
	lintian --fail-on error dist/studio-agent_$$(dpkg-parsechangelog -S Version)_amd64.deb

demo: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" packaging/demo.sh

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

unit: venv
	$(BIN)/python -m pytest tests/unit -m "not integration and not system"; rc=$$?; [ $$rc -ne 5 ] || echo "pytest collected no tests" >&2; exit $$rc

# pytest exits 5 when it collected nothing: say so, and fail.
# deploy-tools: ansible-playbook for tests/system/test_deploy_ansible.py (the .deb builds itself).
# What the machine lacks (Debian packages, Apptainer): installed as root, else named with the
# one command to run (scripts/setup-test-host.sh).
test-host:
	scripts/setup-test-host.sh

test: test-host lint studioml-client deploy-tools
	$(BIN)/python -m pytest; rc=$$?; [ $$rc -ne 5 ] || echo "pytest collected no tests" >&2; exit $$rc

bench: venv studioml-client
	$(BIN)/python bench/overhead.py

clean:
	rm -rf $(VENV) $(CLIENT) .demo
