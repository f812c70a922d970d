-- Argo CD health check for distillation.dev/v1alpha1 Distillation: the value of
-- resource.customizations.health.distillation.dev_Distillation in argocd-cm (the chart's
-- README, "GitOps health"). It reads what the operator writes into status:
--
--   Progressing  no status yet, or status older than the spec (observedGeneration behind
--                metadata.generation), or stages queued/running, the gate being read, the
--                student being served
--   Healthy      Ready=True: the student passed its gate (and, with spec.serve, is served)
--   Degraded     Stalled=True or phase Failed: it needs a person (a failed stage or gate, an
--                invalid spec, a missing API, a refused write)
--   Suspended    phase Suspended: spec.policy.suspend holds the stages
--
-- The message is the operator's: Stalled's when stalled, else Ready's. No Lua library beyond
-- Argo CD's default set is used (no useOpenLibs needed).

local hs = {}

local function conditions_by_type(status)
  local found = {}
  if status.conditions ~= nil then
    for _, condition in ipairs(status.conditions) do
      if condition.type ~= nil then
        found[condition.type] = condition
      end
    end
  end
  return found
end

local function message_of(condition, fallback)
  if condition ~= nil and condition.message ~= nil and condition.message ~= "" then
    return condition.message
  end
  if condition ~= nil and condition.reason ~= nil then
    return condition.reason
  end
  return fallback
end

local status = obj.status
if status == nil or status.observedGeneration == nil then
  hs.status = "Progressing"
  hs.message = "waiting for the distillation operator to report status"
  return hs
end

local generation = nil
if obj.metadata ~= nil then
  generation = obj.metadata.generation
end
if generation ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "waiting for the operator to observe generation " .. generation
    .. " (status describes generation " .. status.observedGeneration .. ")"
  return hs
end

local by_type = conditions_by_type(status)
local ready = by_type["Ready"]
local stalled = by_type["Stalled"]

if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = message_of(stalled, "stalled")
  return hs
end
if status.phase == "Failed" then
  hs.status = "Degraded"
  hs.message = message_of(ready, "failed")
  return hs
end
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = message_of(ready, "ready")
  return hs
end
if status.phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = message_of(ready, "spec.policy.suspend is true")
  return hs
end
hs.status = "Progressing"
hs.message = message_of(ready, "in progress")
return hs
