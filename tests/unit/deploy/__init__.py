"""Tests of ``deploy/``: the kustomize manifests, rendered offline by ``kubectl kustomize``.

What each module proves: ``test_manifests`` that every overlay renders, that
every object is valid against Kubernetes' published schemas, and that the
output is the reviewed golden file; ``test_programs`` that the manifests run
the programs with flags, environment, ports and paths the programs really
have; ``test_rbac`` that the ClusterRoles grant what the Kubernetes code
calls and nothing more; ``test_crds`` that our Istio CRDs are structural,
current with their generator, and accept Istio's objects (ours in
``examples/`` among them) while refusing malformed ones.
"""
