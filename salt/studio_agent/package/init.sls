# -*- coding: utf-8 -*-
# vim: ft=sls
---
{%- set tplroot = tpldir.split("/")[0] %}
{%- from tplroot ~ "/map.jinja" import mapdata as studio_agent with context %}

# pkg.installed compares the .deb's version with the installed one: re-runs change nothing,
# and a newer .deb upgrades (the package stops the agent, which drains, then starts it again).
studio_agent-package-install-pkg-installed:
  pkg.installed:
    - sources:
      - {{ studio_agent.pkg.name }}: {{ studio_agent.deb | json }}
