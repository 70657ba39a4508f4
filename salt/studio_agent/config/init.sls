# -*- coding: utf-8 -*-
# vim: ft=sls
---
{%- set tplroot = tpldir.split("/")[0] %}
{%- from tplroot ~ "/map.jinja" import mapdata as studio_agent with context %}
{%- set sls_package = tplroot ~ '.package' %}

include:
  - {{ sls_package }}
  - .credentials

# A drop-in, not agent.yaml: that is the package's conffile, and dpkg would ask on upgrades.
studio_agent-config-file-file-managed:
  file.managed:
    - name: {{ studio_agent.config.dropin }}
    - source: salt://{{ tplroot }}/files/default/agent.yaml.jinja
    - template: jinja
    - user: root
    - group: {{ studio_agent.user }}
    - mode: '0640'
    - check_cmd: /usr/bin/studio-agent check-config
    - context:
        settings: {{ studio_agent.config.settings | json }}
    - require:
      - sls: {{ sls_package }}

# The drop-in alone was valid; this checks it together with agent.yaml and the other drop-ins.
studio_agent-config-check-cmd-run:
  cmd.run:
    - name: /usr/bin/studio-agent check-config >/dev/null
    - onchanges:
      - file: studio_agent-config-file-file-managed

{%- if studio_agent.environment %}

studio_agent-config-environment-file-managed:
  file.managed:
    - name: {{ studio_agent.environment_dropin }}
    - source: salt://{{ tplroot }}/files/default/environment.conf.jinja
    - template: jinja
    - makedirs: true
    - dir_mode: '0755'
    - user: root
    - group: root
    - mode: '0640'
    - context:
        environment: {{ studio_agent.environment | json }}
{%- else %}

studio_agent-config-environment-file-absent:
  file.absent:
    - name: {{ studio_agent.environment_dropin }}
{%- endif %}

# systemd does not notice a drop-in added in a new folder by itself.
studio_agent-config-environment-module-run:
  module.run:
    - service.systemctl_reload: []
    - onchanges:
      - file: {{ studio_agent.environment_dropin }}
