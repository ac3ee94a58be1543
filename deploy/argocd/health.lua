-- Argo CD health check for iam.chainguard.dev/ChainguardIdentity
-- (argocd-cm key resource.customizations.health.iam.chainguard.dev_ChainguardIdentity).
--
-- The operator writes three conditions on every pass (Ready, Reconciling, Stalled) and
-- status.observedGeneration. The rules follow kstatus, so Argo CD, Flux and `kubectl wait` agree:
--   * no status yet, or a status for an older generation of the spec -> Progressing
--   * Stalled=True: the spec cannot work as written                   -> Degraded
--   * Reconciling=True: working on it, or retrying a transient error   -> Progressing
--   * Ready=True                                                       -> Healthy
--   * anything else (no conditions, Ready=False alone)                 -> Progressing
-- The message is the deciding condition's reason and message, which name the field or the action.

local function find_condition(conditions, kind)
  if conditions == nil then
    return nil
  end
  for _, condition in ipairs(conditions) do
    if condition.type == kind then
      return condition
    end
  end
  return nil
end

local function describe(condition)
  local reason = condition.reason or ""
  local message = condition.message or ""
  if reason ~= "" and message ~= "" then
    return reason .. ": " .. message
  end
  return reason .. message
end

local hs = {status = "Progressing", message = "Waiting for the operator to reconcile the resource"}

local status = obj.status
if status == nil then
  return hs
end

local generation = obj.metadata and obj.metadata.generation
local observed = status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local stalled = find_condition(status.conditions, "Stalled")
if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = describe(stalled)
  return hs
end

local reconciling = find_condition(status.conditions, "Reconciling")
if reconciling ~= nil and reconciling.status == "True" then
  hs.message = describe(reconciling)
  return hs
end

local ready = find_condition(status.conditions, "Ready")
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = describe(ready)
  return hs
end
if ready ~= nil then
  hs.message = describe(ready)
end
return hs
