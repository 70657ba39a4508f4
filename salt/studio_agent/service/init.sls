# -*- coding: utf-8 -*-
# vim: ft=sls
---
{%- set tplroot = tpldir.split("/")[0] %}
{%- from tplroot ~ "/map.jinja" import mapdata as studio_agent with context %}
{%- set sls_config = tplroot ~ '.config' %}

include:
  - {{ sls_config }}

# A changed config or environment restarts the agent, which drains first. Credentials do not:
# the agent watches the certs dir itself.
studio_agent-service-running-service-running:
  service.running:
    - name: {{ studio_agent.service.name }}
    - enable: {{ studio_agent.service.enable }}
    - require:
      - sls: {{ tplroot }}.package
    - watch:
      - file: studio_agent-config-file-file-managed
      - file: {{ studio_agent.environment_dropin }}
