# -*- coding: utf-8 -*-
# vim: ft=sls
---
{%- set tplroot = tpldir.split("/")[0] %}
{%- from tplroot ~ "/map.jinja" import mapdata as studio_agent with context %}

include:
  - {{ tplroot }}.service.clean

studio_agent-package-clean-pkg-purged:
  pkg.purged:
    - name: {{ studio_agent.pkg.name }}
    - require:
      - sls: {{ tplroot }}.service.clean
