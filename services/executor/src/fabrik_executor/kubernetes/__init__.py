"""The `kubernetes` executor backend: a Job per attempt, a workspace PVC per run, one watch on Jobs
and one on Pods, logs followed from the API server.

| module | what |
|---|---|
| `render.py` | pure manifest rendering (PVC, Job, per-attempt Secrets, mirrored Secrets) |
| `mapping.py` | pure: a Job and its pods → the attempt's phase and, once it ended, its verdict |
| `watch.py` | `Informer`: list + watch with resourceVersion, bookmarks, relist on 410 Gone |
| `logs.py` | following the workload container's log with timestamps, resumable from a cursor |
| `retention.py` | the reaper's decisions (pure) for workspace PVCs and mirrored Secrets |
| `api.py` | the kubernetes-asyncio client, its configuration and error helpers |
| `backend.py` | `KubernetesBackend`: start, cancel, resume, recovery, finishing exactly once |

See docs/kubernetes.md.
"""
