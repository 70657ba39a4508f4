# -*- coding: utf-8 -*-
# vim: ft=sls
---
{%- set tplroot = tpldir.split("/")[0] %}
{%- from tplroot ~ "/map.jinja" import mapdata as studio_agent with context %}

# Stopping drains: running experiments finish (or are requeued) within drain_timeout.
studio_agent-service-clean-service-dead:
  service.dead:
    - name: {{ studio_agent.service.name }}
    - enable: false
