# -*- coding: utf-8 -*-
# vim: ft=sls
---
{%- set tplroot = tpldir.split("/")[0] %}
{%- from tplroot ~ "/map.jinja" import mapdata as studio_agent with context %}
{%- if studio_agent.apptainer.enabled %}

# The script is idempotent and leaves a marker when it is done.
studio_agent-apptainer-install-cmd-script:
  cmd.script:
    - source: {{ studio_agent.apptainer.script }}
    - creates: {{ studio_agent.apptainer.creates }}
{%- endif %}
