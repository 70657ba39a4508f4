# -*- coding: utf-8 -*-
# vim: ft=sls
# The files this state wrote; purging the package removes the rest of /etc/studio-agent.
---
{%- set tplroot = tpldir.split("/")[0] %}
{%- from tplroot ~ "/map.jinja" import mapdata as studio_agent with context %}

studio_agent-config-clean-file-absent:
  file.absent:
    - names:
      - {{ studio_agent.config.dropin }}
      - {{ studio_agent.environment_dropin }}
