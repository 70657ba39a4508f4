# -*- coding: utf-8 -*-
# vim: ft=sls
# Credential files in the certs dir. The agent refuses files that are not its own or that
# group/others can read, and picks up changes within a second (no restart).
---
{%- set tplroot = tpldir.split("/")[0] %}
{%- from tplroot ~ "/map.jinja" import mapdata as studio_agent with context %}
{%- set sls_package = tplroot ~ '.package' %}
{#- The certs dir's layout: credential files, and the keys of encrypted, signed messages. #}
{%- set forms = [
      'rabbitmq/[^/.][^/]*',
      'sqs/[^/.][^/]*/(credentials|config)',
      'pubsub/[^/.][^/]*[.]json',
      'message/encryption/ssh-privatekey',
      'message/passphrase/ssh-passphrase',
      'queues/signing/[^/.][^/]*',
    ] %}
{%- set pattern = '^(' ~ forms | join('|') ~ ')$' %}

include:
  - {{ sls_package }}

studio_agent-config-certs-dir-file-directory:
  file.directory:
    - name: {{ studio_agent.certs_dir }}
    - user: {{ studio_agent.user }}
    - group: {{ studio_agent.user }}
    - mode: '0700'
    - require:
      - sls: {{ sls_package }}

{%- for path, content in studio_agent.credentials | dictsort %}
{%-   if not path | regex_match(pattern) %}

studio_agent-config-credential-{{ loop.index }}-test-fail-without-changes:
  test.fail_without_changes:
    - name: >-
        credentials: {{ path }} must be rabbitmq/<name>, sqs/<name>/credentials,
        sqs/<name>/config, pubsub/<name>.json, message/encryption/ssh-privatekey,
        message/passphrase/ssh-passphrase or queues/signing/<queue prefix>
{%-   elif content is none %}

studio_agent-config-credential-{{ loop.index }}-file-absent:
  file.absent:
    - name: {{ studio_agent.certs_dir }}/{{ path }}
{%-   else %}

studio_agent-config-credential-{{ loop.index }}-file-managed:
  file.managed:
    - name: {{ studio_agent.certs_dir }}/{{ path }}
    - contents_pillar: studio_agent:credentials:{{ path }}
    - show_changes: false
    - makedirs: true
    - dir_mode: '0700'
    - user: {{ studio_agent.user }}
    - group: {{ studio_agent.user }}
    - mode: '0600'
    - require:
      - file: studio_agent-config-certs-dir-file-directory
{%-   endif %}
{%- endfor %}
